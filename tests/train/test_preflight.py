"""Pre-flight (vlsi.train.preflight) on fabricated checkpoints, verbalizers and data, and on the tiny
pair: each check's one-line refusal, what passes, and the plan's lines. (The GPU memory check
is tested in tests/train/stages/test_gpu_fit.py; the same failures through ``vlsi distill`` in
tests/train/stages/test_run_identity.py.)"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from vlsi.errors import VlsiError
from vlsi.train import preflight
from vlsi.train.config import DataConfig, InteractionConfig, RunConfig, TrainingConfig
from vlsi.train.preflight import (Preflight, check_data, check_layer_counts, check_output_dir, check_pair,
                                  check_run, check_verbalizers, gpu_memory, launch_engine, plan_lines)
from vlsi.train.resolved import ModelFacts, cached_teacher_parameters, model_facts, safetensors_parameters, text_config
from vlsi.train.teacher_cache import FORMAT, MANIFEST


def _checkpoint(root: Path, *, model_type: str = "qwen2_vl", layers: int = 8, hidden: int = 96,
                vocab: int = 600, tensors: dict[str, tuple[int, ...]] | None = None, nested: bool = True) -> Path:
    """A checkpoint directory of ``config.json`` and zero weights of the given shapes."""
    root.mkdir(parents=True)
    text = {"num_hidden_layers": layers, "hidden_size": hidden, "vocab_size": vocab}
    config = {"model_type": model_type, "text_config": text} if nested else {"model_type": model_type, **text}
    (root / "config.json").write_text(json.dumps(config))
    if tensors is not False:
        save_file({name: torch.zeros(shape) for name, shape in (tensors or {"w": (10, 10)}).items()},
                  str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


def _facts(model_type="qwen2_vl", parameters=100, layers=(1, 5), num_layers=8, hidden=96, vocab=600) -> ModelFacts:
    return ModelFacts(Path("/m"), model_type, num_layers, hidden, vocab, parameters, list(layers))


def test_parameters_are_summed_from_every_safetensors_header(tmp_path):
    root = _checkpoint(tmp_path / "m", tensors={"a": (3, 4), "b": (5,)})
    save_file({"c": torch.zeros(2, 2, 2), "scalar": torch.zeros(())}, str(root / "model-2.safetensors"))
    assert safetensors_parameters(root) == 12 + 5 + 8 + 1  # __metadata__ is not a tensor
    (root / "model.safetensors").unlink()
    (root / "model-2.safetensors").unlink()
    with pytest.raises(VlsiError, match=r"no \*\.safetensors weights"):
        safetensors_parameters(root)


def test_text_config_is_the_nested_one_when_there_is_one(tmp_path):
    assert text_config(_checkpoint(tmp_path / "a"))["hidden_size"] == 96
    assert text_config(_checkpoint(tmp_path / "b", nested=False, hidden=64))["hidden_size"] == 64


def test_model_facts_from_config_and_headers(tmp_path):
    root = _checkpoint(tmp_path / "m", tensors={"a": (7, 3)})
    facts = model_facts(root, "teacher", None)
    assert facts == ModelFacts(root, "qwen2_vl", 8, 96, 600, 21, [1, 5])  # the default rule: every 4th from 1
    assert model_facts(root, "teacher", [0, 2]).target_layers == [0, 2]
    assert model_facts(root, "teacher", None, parameters=10**9).parameters == 10**9  # a cached teacher's count
    with pytest.raises(VlsiError, match=r"^verbalizer\.student_layers: target layer 7 is the last layer"):
        model_facts(root, "student", [1, 7])
    with pytest.raises(VlsiError, match="model path not found"):
        model_facts(tmp_path / "nope", "student", None)
    with pytest.raises(VlsiError):
        model_facts(_checkpoint(tmp_path / "bert", model_type="bert"), "student", None)  # not a supported family
    broken = _checkpoint(tmp_path / "broken")
    (broken / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "text_config": {"hidden_size": 8}}))
    with pytest.raises(VlsiError, match=r"config\.json: cannot read the text model's shape"):
        model_facts(broken, "student", None)


def test_check_pair_refuses_families_sizes_and_layer_counts():
    check_pair(_facts(parameters=100), _facts(parameters=50, layers=(1,)))
    with pytest.raises(VlsiError, match=r"teacher \(qwen2_vl\) and student \(llava_onevision\) are different model families"):
        check_pair(_facts(), _facts(model_type="llava_onevision"))
    with pytest.raises(VlsiError, match=r"the student \(1,000 parameters\) is larger than the teacher \(100\); "
                                        r"are teacher and student swapped\?"):
        check_pair(_facts(parameters=100), _facts(parameters=1000))
    with pytest.raises(VlsiError, match=r"t_s=3 \[0, 1, 2\] > t_l=2 \[1, 5\]"):
        check_pair(_facts(), _facts(parameters=1, layers=(0, 1, 2)))
    check_layer_counts([1, 2], [1, 2])  # t_s = t_l is allowed


def _verbalizers(root: Path, layers=(1, 5), **backbone) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    saved = {"layers": list(layers), "backbone": {"model_type": "qwen2_vl", "hidden_size": 96, "num_layers": 8,
                                                  "vocab_size": 600, **backbone}}
    (root / "verbalizers.json").write_text(json.dumps(saved))
    (root / "verbalizers.safetensors").write_bytes(b"weights")
    return root


def test_check_verbalizers(tmp_path):
    facts = _facts()
    assert check_verbalizers(_verbalizers(tmp_path / "ok"), facts, "teacher", None) == [1, 5]
    assert check_verbalizers(tmp_path / "ok", facts, "teacher", [5, 1]) == [1, 5]  # order does not count
    with pytest.raises(VlsiError, match=r"teacher verbalizers not found: .* \(run `vlsi verbalize CONFIG --role teacher` first\)"):
        check_verbalizers(tmp_path / "none", facts, "teacher", None)
    with pytest.raises(VlsiError, match=r"these verbalizers do not fit the student \(hidden_size: verbalizers 64 vs student 96\)"):
        check_verbalizers(_verbalizers(tmp_path / "small", hidden_size=64), facts, "student", None)
    with pytest.raises(VlsiError, match=r"trained on teacher layers \[1, 5\], but verbalizer\.teacher_layers is \[1, 3\]"):
        check_verbalizers(tmp_path / "ok", facts, "teacher", [1, 3])
    with pytest.raises(VlsiError, match=r"target layers \[7\] do not exist below the last layer of the 8-layer teacher"):
        check_verbalizers(_verbalizers(tmp_path / "deep", layers=(1, 7)), facts, "teacher", None)
    broken = _verbalizers(tmp_path / "broken")
    (broken / "verbalizers.json").write_text('{"backbone": {}}')
    with pytest.raises(VlsiError, match="cannot read the target layers"):
        check_verbalizers(broken, facts, "teacher", None)


def test_check_output_dir(tmp_path):
    model = tmp_path / "models" / "student"
    model.mkdir(parents=True)
    check_output_dir(tmp_path / "run", [model])
    check_output_dir(tmp_path / "models" / "run", [model])  # beside the model: fine
    for inside in (model, model / "run", model / "a" / "b"):
        with pytest.raises(VlsiError, match=r"is inside the model directory .*; choose a directory of its own"):
            check_output_dir(inside, [tmp_path / "other", model])


def test_cached_teacher_parameters(tmp_path):
    teacher = _checkpoint(tmp_path / "teacher")
    cfg = RunConfig(teacher=str(teacher), interaction=InteractionConfig(teacher_cache=str(tmp_path / "cache")))
    assert cached_teacher_parameters(cfg) is None  # the weights are there
    (teacher / "model.safetensors").unlink()
    assert cached_teacher_parameters(RunConfig(teacher=str(teacher))) is None  # no cache named
    (tmp_path / "cache").mkdir()
    manifest = {"format": FORMAT, "complete": False, "teacher": {}}
    (tmp_path / "cache" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VlsiError, match=r"no \*\.safetensors weights, and the teacher cache .* is not complete"):
        cached_teacher_parameters(cfg)
    manifest["complete"] = True
    (tmp_path / "cache" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VlsiError, match="does not record the teacher's size"):
        cached_teacher_parameters(cfg)
    (tmp_path / "cache" / MANIFEST).write_text(json.dumps({**manifest, "teacher_parameters": 1234}))
    assert cached_teacher_parameters(cfg) == 1234


def test_launch_engine_names_the_engine_and_the_processes():
    def args(world=1, zero=None, fsdp=None):
        return SimpleNamespace(world_size=world, fsdp_plugin_args=fsdp,
                               deepspeed_plugin=SimpleNamespace(zero_stage=zero) if zero is not None else None)

    assert launch_engine(args()) == ("ddp", "one process")
    assert launch_engine(args(4)) == ("ddp", "DDP x 4")
    assert launch_engine(args(8, zero=3)) == ("zero3", "ZeRO-3 x 8")
    assert launch_engine(args(2, zero=2)) == ("zero2", "ZeRO-2 x 2")
    assert launch_engine(args(2, zero=1)) == ("ddp", "ZeRO-1 x 2")
    assert launch_engine(args(2, fsdp={})) == ("fsdp", "FSDP x 2")
    assert gpu_memory(SimpleNamespace(use_cpu=True)) is None


def _data(synth_dir: Path, tmp_path: Path, bad: int) -> Path:
    """The synthetic training file with its first ``bad`` records' images missing."""
    records = json.loads((synth_dir / "train.json").read_text())
    for record in records[:bad]:
        record["image"] = "images/missing.png"
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path


def test_check_data_reads_and_encodes_a_sample(tiny_pair, synth_dir, tmp_path, monkeypatch):
    student = tiny_pair("qwen2_vl").student

    def cfg(*files, root=synth_dir) -> RunConfig:
        return RunConfig(data=DataConfig(train=[str(f) for f in files], image_root=str(root), max_length=512))

    monkeypatch.setattr(preflight, "DATA_SAMPLE", 5)
    assert check_data(cfg(_data(synth_dir, tmp_path, bad=2)), student) == "a sample of 5 records: 3 usable"
    all_bad = _data(synth_dir, tmp_path, bad=16)
    with pytest.raises(VlsiError, match=r"^data\.train: none of the first 5 records is usable \(first: train-000000: image not found: "):
        check_data(cfg(all_bad), student)
    with pytest.raises(VlsiError, match=r"^data\.train: /nonexistent\.json not found"):
        check_data(cfg(synth_dir / "train.json", "/nonexistent.json"), student)
    with pytest.raises(VlsiError, match=r"^data\.image_root: .* is not a directory"):
        check_data(cfg(synth_dir / "train.json", root=tmp_path / "nope"), student)


def test_check_run_on_the_tiny_pair(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path / "run")
    every = check_run(cfg, ("teacher-verbalize", "student-verbalize", "interact", "sft"), out=tmp_path / "run")
    assert every.teacher.model_type == every.student.model_type == "qwen2_vl"
    assert every.student.parameters < every.teacher.parameters
    assert every.vocab == min(every.teacher.vocab_size, every.student.vocab_size)
    assert every.data.startswith("a sample of 16 records: 16 usable")
    sft = check_run(cfg, ("sft",))
    assert sft.teacher is None and sft.vocab is None  # the student's own step reads no teacher


def test_plan_lines_describe_models_matching_data_and_each_step():
    cfg = RunConfig(teacher="/t", student="/s", output_dir="/out", data=DataConfig(train=["/d/train.json"]),
                    training=TrainingConfig(max_steps=20, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                            learning_rate=1e-3, min_learning_rate=1e-5),
                    sft={"max_steps": -1, "num_train_epochs": 2.0})
    pre = Preflight(ModelFacts(Path("/t"), "qwen2_vl", 8, 96, 600, 2_500_000_000, [1, 5]),
                    ModelFacts(Path("/s"), "qwen2_vl", 4, 64, 520, 10_000_000, [1]), 520, "a sample of 3 records: 3 usable")
    lines = plan_lines(cfg, pre, [("teacher-verbalize", Path("/out/1")), ("sft", Path("/out/4"))])
    assert lines == [
        "teacher: /t (qwen2_vl, 2.50B parameters, 8 layers x 96; target layers [1, 5])",
        "student: /s (qwen2_vl, 0.01B parameters, 4 layers x 64; target layers [1])",
        "shared vocabulary 520; matching vlsi (temperature paper), ops kld/kld; LoRA r=64",
        "data: /d/train.json (a sample of 3 records: 3 usable)",
        "  teacher-verbalize: 20 steps, batch 4 x 2 accumulation per device, lr 0.001 -> 1e-05 -> /out/1",
        "  sft: 2 epochs, batch 4 x 2 accumulation per device, lr 0.001 -> 1e-05 -> /out/4",
    ]
