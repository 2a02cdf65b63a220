"""The interaction stage (vlsi.train.stages.interact) on tiny models: what trains, matches, resume, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.utils import logging

from vlsi.data.synthetic import SyntheticConfig, generate_dataset
from vlsi.errors import VlsiError
from vlsi.method.verbalizer import VerbalizerSet
from vlsi.models.backbones import load_backbone
from vlsi.models.tiny import build_tiny_tokenizer
from vlsi.train.config import DataConfig, InteractionConfig, RunConfig, TrainingConfig, VerbalizerConfig
from vlsi.train.stages import interact
from vlsi.train.stages.interact import run_interact
from vlsi.train.stages.interact_draws import matching_seed
from vlsi.train.stages.interact_timing import device_clock

torch.set_num_threads(1)  # tiny models; extra threads only spin when the CPUs are shared
logging.set_verbosity_error()
logging.disable_progress_bar()

STUDENT_LAYERS, TEACHER_LAYERS = [1, 2], [1, 3, 5]
STEPS = 4


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interact_data")
    generate_dataset(root, SyntheticConfig(seed=0, num_train=32, num_eval=4))
    return root / "train.json"


def save_verbalizers(model_dir: Path, layers: list[int], out: Path) -> Path:
    """Untrained verbalizers (the logit lens plus random gates) are enough for the mechanics."""
    torch.manual_seed(0)
    VerbalizerSet(load_backbone(model_dir), layers).save(out)
    return out


@pytest.fixture(scope="module")
def verbalizers(tiny_pair, tmp_path_factory):
    """(teacher_dir, student_dir) per family."""
    root = tmp_path_factory.mktemp("interact_verbalizers")
    made = {}

    def get(family: str = "qwen2_vl") -> tuple[Path, Path]:
        if family not in made:
            pair = tiny_pair(family)
            made[family] = (save_verbalizers(pair.teacher, TEACHER_LAYERS, root / family / "teacher"),
                            save_verbalizers(pair.student, STUDENT_LAYERS, root / family / "student"))
        return made[family]

    return get


def make_config(pair, data_file: Path, **training) -> RunConfig:
    settings = dict(max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                    save_steps=2, logging_steps=1, bf16=False, learning_rate=1e-3, gradient_checkpointing=True)
    settings.update(training)
    return RunConfig(
        teacher=str(pair.teacher), student=str(pair.student), output_dir="unused",
        data=DataConfig(train=[str(data_file)], max_length=512),
        interaction=InteractionConfig(chunk_size=16),
        training=TrainingConfig(**settings),
    )


def recording(trainers: list) -> type:
    """An InteractTrainer that keeps a reference to itself in ``trainers``."""

    class Recording(interact.InteractTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    return Recording


@pytest.fixture(scope="module")
def full_run(tiny_pair, verbalizers, data_file, tmp_path_factory):
    """One uninterrupted 4-step run; returns (out_dir, trainer, pair)."""
    pair = tiny_pair("qwen2_vl")
    t_dir, s_dir = verbalizers("qwen2_vl")
    out = tmp_path_factory.mktemp("interact_run") / "interact"
    trainers: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interact, "InteractTrainer", recording(trainers))
        run_interact(make_config(pair, data_file), out, teacher_verbalizers=t_dir, student_verbalizers=s_dir)
    return out, trainers[0], pair


# -- pieces ------------------------------------------------------------------------------------


def test_matching_seed_depends_on_every_part():
    seeds = {matching_seed(s, step, draw) for s in (0, 1) for step in (0, 1) for draw in range(4)}
    assert len(seeds) == 16
    assert 0 <= matching_seed(42, 3, 1) < 2**63


def test_matching_seed_of_one_process_is_unchanged():
    """One-process seeds are those the shipped demo results were made with (process index 0)."""
    import hashlib

    digest = hashlib.sha256(b"vlsi-matching:42:3:1:0").digest()
    assert matching_seed(42, 3, 1) == int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def test_device_clock_waits_for_a_gpu_only(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    device_clock(torch.device("cpu"))
    assert waited == []
    device_clock(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]


# -- the stage ---------------------------------------------------------------------------------


def test_outputs_are_written(full_run):
    out, _, _ = full_run
    for name in ("matches.json", "matches.jsonl", "metrics.jsonl", "step_complete.json",
                 "heatmap_start.png", "heatmap_start.json", "heatmap_end.png", "heatmap_end.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "checkpoint-2", "checkpoint-4"):
        assert (out / name).exists(), name
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 64
    summary = json.loads((out / "step_complete.json").read_text())
    assert summary["global_step"] == STEPS and summary["strategy"] == "vlsi"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in records for k in r}
    assert {"loss", "interaction_loss", "last_layer_loss", "mean_kld", "matched_kld"} <= logged
    timed = {f"seconds/{part}" for part in ("student_forward", "teacher_forward", "scoring_pass",
                                            "gradient_pass", "student_backward")}
    assert timed <= logged
    assert all(r[k] >= 0 for r in records for k in timed if k in r)


def test_only_lora_weights_train(full_run):
    _, trainer, pair = full_run
    student, fresh = trainer.model, load_backbone(pair.student)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and "language_model.layers." in n for n in trainable)
    # every original weight (vision, projector, embeddings, layers, norm, head) is unchanged;
    # PEFT moves a wrapped linear's weight to `<name>.base_layer.weight`
    trained = student.get_base_model().state_dict()
    for name, before in fresh.model.state_dict().items():
        wrapped = name.rsplit(".", 1)[0] + ".base_layer." + name.rsplit(".", 1)[1]
        assert torch.equal(before, trained.get(name, trained.get(wrapped))), name
    lora_b = [p for n, p in student.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it moved
    assert student.get_base_model().is_activation_checkpointing  # training.gradient_checkpointing


def test_teacher_is_frozen_and_unchanged(full_run):
    _, trainer, pair = full_run
    teacher = trainer.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    fresh = load_backbone(pair.teacher).model.state_dict()
    for name, after in teacher.state_dict().items():
        assert torch.equal(fresh[name], after), name


def test_verbalizers_are_unchanged(full_run, verbalizers):
    _, trainer, _ = full_run
    t_dir, s_dir = verbalizers("qwen2_vl")
    for vset, d in ((trainer.teacher_verbalizers, t_dir), (trainer.student_verbalizers, s_dir)):
        saved = load_file(d / "verbalizers.safetensors")
        assert not any(p.requires_grad for p in vset.parameters())
        for k, v in vset.state_dict().items():
            assert torch.equal(saved[k], v), k


def test_matches_count_one_pair_per_student_layer_per_step(full_run):
    out, _, _ = full_run
    matches = json.loads((out / "matches.json").read_text())
    assert matches["student_layers"] == STUDENT_LAYERS and matches["teacher_layers"] == TEACHER_LAYERS
    assert sum(map(sum, matches["counts"])) == STEPS * len(STUDENT_LAYERS)
    assert [step for step, _ in matches["history"]] == list(range(1, STEPS + 1))
    t_l = len(TEACHER_LAYERS)
    for _, flat in matches["history"]:  # Algorithm 1: one teacher layer per row, increasing
        columns = [f % t_l for f in flat]
        assert sorted(f // t_l for f in flat) == [0, 1] and columns == sorted(set(columns))


def test_heatmaps_are_pngs_with_json(full_run):
    out, _, _ = full_run
    for name in ("start", "end"):
        with Image.open(out / f"heatmap_{name}.png") as im:
            assert im.format == "PNG" and im.width > 50
        payload = json.loads((out / f"heatmap_{name}.json").read_text())
        assert payload["row_labels"] == STUDENT_LAYERS and payload["col_labels"] == TEACHER_LAYERS
        assert payload["teacher_layers"] == TEACHER_LAYERS
        assert sum(map(sum, payload["counts"])) == len(STUDENT_LAYERS)  # 10% of 4 steps: 1 step
    assert json.loads((out / "heatmap_start.json").read_text())["steps"] == [1, 1]
    assert json.loads((out / "heatmap_end.json").read_text())["steps"] == [STEPS, STEPS]


class Crash(Exception):
    pass


def test_resume_draws_the_same_pairs_as_an_uninterrupted_run(full_run, verbalizers, data_file, tmp_path):
    reference, _, pair = full_run
    t_dir, s_dir = verbalizers("qwen2_vl")
    cfg, out = make_config(pair, data_file), tmp_path / "interact"

    class CrashingAtStep4(interact.InteractTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            if self.state.global_step == 3:  # steps 1-3 done (and recorded), checkpoint-2 saved
                raise Crash
            return super().compute_loss(model, inputs, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interact, "InteractTrainer", CrashingAtStep4)
        with pytest.raises(Crash):
            run_interact(cfg, out, teacher_verbalizers=t_dir, student_verbalizers=s_dir)
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    with pytest.raises(VlsiError, match="--resume"):
        run_interact(cfg, out, teacher_verbalizers=t_dir, student_verbalizers=s_dir)

    run_interact(cfg, out, teacher_verbalizers=t_dir, student_verbalizers=s_dir, resume=True)
    resumed = json.loads((out / "matches.json").read_text())
    expected = json.loads((reference / "matches.json").read_text())
    assert resumed["history"] == expected["history"]  # step 3 not doubled, same draws
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_llava_onevision_with_gradient_accumulation(tiny_pair, verbalizers, data_file, tmp_path):
    t_dir, s_dir = verbalizers("llava_onevision")
    cfg = make_config(tiny_pair("llava_onevision"), data_file, max_steps=2, gradient_accumulation_steps=2)
    out = run_interact(cfg, tmp_path / "interact", teacher_verbalizers=t_dir, student_verbalizers=s_dir)
    matches = json.loads((out / "matches.json").read_text())
    assert [step for step, _ in matches["history"]] == [1, 1, 2, 2]  # one update per micro-batch
    assert sum(map(sum, matches["counts"])) == 2 * 2 * len(STUDENT_LAYERS)


def test_ce_ops_train_on_the_ground_truth_tokens(tiny_pair, verbalizers, data_file, tmp_path):
    """With ce / ce the loss gets the batch's next tokens: on the first micro-batch (LoRA B = 0,
    the student as loaded) its last-layer term is the student's ordinary next-token loss."""
    pair = tiny_pair("qwen2_vl")
    cfg = make_config(pair, data_file, max_steps=1)
    cfg.interaction = InteractionConfig(chunk_size=16, intermediate_op="ce", last_op="ce")
    seen: list = []
    real_loss = interact.interaction_loss

    def spy(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        seen.append((kwargs["labels"], kwargs["vocab_size"], result))
        return result

    class Keeping(interact.InteractTrainer):
        def compute_loss(self, model, inputs, **kwargs):
            seen.append(dict(inputs))
            return super().compute_loss(model, inputs, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interact, "interaction_loss", spy)
        mp.setattr(interact, "InteractTrainer", Keeping)
        run_interact(cfg, tmp_path / "interact", teacher_verbalizers=verbalizers("qwen2_vl")[0],
                     student_verbalizers=verbalizers("qwen2_vl")[1])
    inputs, (labels, vocab, result) = seen[0], seen[1]
    assert torch.equal(labels, inputs["labels"][:, 1:][inputs["labels"][:, 1:] != -100])
    student = load_backbone(pair.student)
    with torch.no_grad():
        logits = student.model(**student.model_inputs(inputs)).logits[:, :-1, :vocab].float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), inputs["labels"][:, 1:].flatten())
    assert result.last_loss == pytest.approx(float(expected), rel=1e-4)
    assert (result.pair_losses[result.weights > 0] > 0).all()


# -- one-line errors ---------------------------------------------------------------------------


def expect_error(cfg, out, t_dir, s_dir, message):
    with pytest.raises(VlsiError, match=message) as err:
        run_interact(cfg, out, teacher_verbalizers=t_dir, student_verbalizers=s_dir)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_tokenizer_mismatch(tiny_pair, verbalizers, data_file, tmp_path):
    pair = tiny_pair("qwen2_vl")
    other = tmp_path / "student"
    shutil.copytree(pair.student, other)
    build_tiny_tokenizer(vocab_size=400).save_pretrained(other)
    cfg = make_config(pair, data_file)
    cfg.student = str(other)
    expect_error(cfg, tmp_path / "out", *verbalizers("qwen2_vl"), "tokenizers differ")


def test_more_student_than_teacher_layers(tiny_pair, data_file, tmp_path):
    pair = tiny_pair("qwen2_vl")
    t_dir = save_verbalizers(pair.teacher, [1, 3], tmp_path / "t")
    s_dir = save_verbalizers(pair.student, [0, 1, 2], tmp_path / "s")
    expect_error(make_config(pair, data_file), tmp_path / "out", t_dir, s_dir, r"t_s=3 .* t_l=2")


def test_configured_layers_must_match_the_verbalizers(tiny_pair, verbalizers, data_file, tmp_path):
    pair = tiny_pair("qwen2_vl")
    cfg = make_config(pair, data_file)
    cfg.verbalizer = VerbalizerConfig(student_layers=[0])
    expect_error(cfg, tmp_path / "out", *verbalizers("qwen2_vl"), "student_layers")


def test_verbalizers_that_do_not_fit(tiny_pair, verbalizers, data_file, tmp_path):
    pair = tiny_pair("qwen2_vl")
    t_dir, _ = verbalizers("qwen2_vl")
    teacher_made = save_verbalizers(pair.teacher, [1], tmp_path / "wrong")  # built on the teacher
    expect_error(make_config(pair, data_file), tmp_path / "out", t_dir, teacher_made, "do not fit")


def test_missing_paths(tiny_pair, verbalizers, data_file, tmp_path):
    pair = tiny_pair("qwen2_vl")
    t_dir, s_dir = verbalizers("qwen2_vl")
    cfg = make_config(pair, data_file)
    expect_error(cfg, tmp_path / "out", tmp_path / "nowhere", s_dir, "teacher verbalizers not found")
    cfg.teacher = str(tmp_path / "no-model")
    expect_error(cfg, tmp_path / "out", t_dir, s_dir, "model path not found")


def test_student_larger_than_teacher(tiny_pair, data_file, tmp_path):
    pair = tiny_pair("qwen2_vl")
    # roles swapped; layer counts chosen so that t_s <= t_l still holds
    big = save_verbalizers(pair.teacher, [1, 3], tmp_path / "big")
    small = save_verbalizers(pair.student, [1, 2], tmp_path / "small")
    cfg = make_config(pair, data_file)
    cfg.teacher, cfg.student = cfg.student, cfg.teacher
    message = expect_error(cfg, tmp_path / "out", small, big, "larger than the teacher")
    assert "swapped" in message


def test_teacher_and_student_of_different_families(tiny_pair, verbalizers, data_file, tmp_path):
    cfg = make_config(tiny_pair("qwen2_vl"), data_file)
    cfg.teacher = str(tiny_pair("llava_onevision").teacher)
    expect_error(cfg, tmp_path / "out", *verbalizers("qwen2_vl"), "different model families")
