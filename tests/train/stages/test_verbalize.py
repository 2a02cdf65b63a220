"""The verbalization stage (vlsi.train.stages.verbalize) on tiny models: loss, table, outputs, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.utils import logging

from vlsi.data.synthetic import SyntheticConfig, generate_dataset
from vlsi.errors import VlsiError
from vlsi.method.verbalizer import VerbalizerSet, prediction_positions
from vlsi.models.backbones import load_backbone
from vlsi.train.config import DataConfig, RunConfig, TrainingConfig, VerbalizerConfig
from vlsi.train.stages import verbalize
from vlsi.train.stages.verbalize import response_targets, run_verbalize

torch.set_num_threads(1)  # tiny models; extra threads only spin when the CPUs are shared
logging.set_verbosity_error()
logging.disable_progress_bar()

TEACHER_LAYERS = [1, 3, 5]
COLUMNS = ["10%", "30%", "50%", "70%", "90%", "100%"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verbalize_data")
    generate_dataset(root, SyntheticConfig(seed=0, num_train=32, num_eval=4))
    return root / "train.json"


def make_config(pair, data_file: Path, **training) -> RunConfig:
    settings = dict(max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    save_steps=2, logging_steps=1, bf16=False, learning_rate=1e-3)
    settings.update(training)
    return RunConfig(
        teacher=str(pair.teacher), student=str(pair.student), output_dir="unused",
        data=DataConfig(train=[str(data_file)], max_length=512),
        verbalizer=VerbalizerConfig(teacher_layers=TEACHER_LAYERS),
        training=TrainingConfig(**settings),
    )


@pytest.fixture(scope="module")
def teacher_run(tiny_pair, data_file, tmp_path_factory):
    """One 4-step run of the teacher's verbalizers; yields (out_dir, trainer, pair)."""
    pair = tiny_pair("qwen2_vl")
    out = tmp_path_factory.mktemp("verbalize_run") / "teacher"
    trainers = []

    class Recording(verbalize.VerbalizeTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(verbalize, "VerbalizeTrainer", Recording)
        assert run_verbalize(make_config(pair, data_file), "teacher", out) == out
    return out, trainers[0], pair


# -- the loss ----------------------------------------------------------------------------------


def test_response_targets_follow_the_next_token_shift():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 4, -100, -100, -100]])
    positions = prediction_positions(labels)
    assert response_targets(labels, positions).tolist() == [7, 8, 4]


# -- the stage ---------------------------------------------------------------------------------


def test_outputs_are_written(teacher_run):
    out, trainer, _ = teacher_run
    for name in ("verbalizers.safetensors", "verbalizers.json", "layer_loss.json", "layer_loss.md",
                 "layer_loss_steps.jsonl", "metrics.jsonl", "step_complete.json"):
        assert (out / name).is_file(), name
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard log"
    summary = json.loads((out / "step_complete.json").read_text())
    assert summary["stage"] == "verbalize" and summary["role"] == "teacher"
    assert summary["layers"] == TEACHER_LAYERS and summary["global_step"] == 4
    # checkpoints hold the verbalizers only, never the backbone
    for step in (2, 4):
        keys = load_file(out / f"checkpoint-{step}" / "model.safetensors").keys()
        assert keys and all(k.startswith("verbalizers.") for k in keys)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in records for k in r}
    assert {f"loss_layer_{i}" for i in TEACHER_LAYERS} <= logged and "loss" in logged


def test_only_the_verbalizers_train(teacher_run):
    out, trainer, pair = teacher_run
    fresh = load_backbone(pair.teacher)
    trained = trainer.model.backbone
    assert not any(p.requires_grad for p in trained.model.parameters())
    for (name, before), after in zip(fresh.model.state_dict().items(), trained.model.state_dict().values()):
        assert torch.equal(before, after), name
    saved = VerbalizerSet.load(out, fresh)  # fits the backbone it was trained on
    assert saved.layers == TEACHER_LAYERS
    for v in saved.verbalizers:  # W_down starts at zero: any non-zero value is training
        assert v.units[0].down_proj.weight.abs().sum() > 0


def test_layer_loss_table_has_all_six_columns(teacher_run):
    out, _, _ = teacher_run
    table = json.loads((out / "layer_loss.json").read_text())
    assert table["columns"] == COLUMNS and table["layers"] == TEACHER_LAYERS
    for layer in TEACHER_LAYERS:
        values = table["loss"][str(layer)]
        assert len(values) == 6 and all(v is not None and v > 0 for v in values)
    md = (out / "layer_loss.md").read_text()
    assert "| target layer | 10% | 30% | 50% | 70% | 90% | 100% |" in md
    assert all(f"\n| {layer} |" in md for layer in TEACHER_LAYERS)


def test_existing_run_needs_resume_and_a_finished_one_returns(teacher_run, data_file):
    out, _, pair = teacher_run
    cfg = make_config(pair, data_file)
    with pytest.raises(VlsiError, match="--resume") as err:
        run_verbalize(cfg, "teacher", out)
    assert "\n" not in str(err.value)
    before = (out / "step_complete.json").stat().st_mtime_ns
    assert run_verbalize(cfg, "teacher", out, resume=True) == out
    assert (out / "step_complete.json").stat().st_mtime_ns == before


def test_resume_continues_from_the_last_checkpoint(teacher_run, data_file, tmp_path):
    src, _, pair = teacher_run
    out = tmp_path / "teacher"
    shutil.copytree(src, out)
    # as if killed after step 3: checkpoint-2 is the newest complete one, step 3 was logged
    for name in ("checkpoint-4", "step_complete.json", "verbalizers.safetensors", "layer_loss.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    steps_file = out / "layer_loss_steps.jsonl"
    steps_file.write_text("".join(steps_file.read_text().splitlines(keepends=True)[:3]))
    run_verbalize(make_config(pair, data_file), "teacher", out, resume=True)
    steps = [json.loads(line)["step"] for line in steps_file.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 redone once, not duplicated
    assert json.loads((out / "step_complete.json").read_text())["global_step"] == 4
    metric_steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(line)]
    assert metric_steps == [1, 2, 3, 4]
    resumed = load_file(out / "verbalizers.safetensors")
    uninterrupted = load_file(src / "verbalizers.safetensors")
    for k in uninterrupted:
        assert torch.allclose(resumed[k], uninterrupted[k], atol=1e-6), k


def test_loss_decreases_on_a_fixed_batch(tiny_pair, data_file, tmp_path):
    records = json.loads(data_file.read_text())[:2]
    for r in records:
        r["image"] = str(data_file.parent / r["image"])
    two = tmp_path / "two.json"
    two.write_text(json.dumps(records))
    cfg = make_config(tiny_pair("qwen2_vl"), two, max_steps=20, gradient_accumulation_steps=1,
                      save_steps=100, logging_steps=5, learning_rate=1e-2, min_learning_rate=1e-4)
    out = run_verbalize(cfg, "student", tmp_path / "student")
    table = json.loads((out / "layer_loss.json").read_text())
    for layer, values in table["loss"].items():  # student default layer rule: [1]
        assert values[-1] < values[0] - 0.1, (layer, values)
        assert values == sorted(values, reverse=True), (layer, values)


def test_llava_onevision_student(tiny_pair, data_file, tmp_path):
    cfg = make_config(tiny_pair("llava_onevision"), data_file, max_steps=2, save_steps=2)
    out = run_verbalize(cfg, "student", tmp_path / "student")
    saved = json.loads((out / "verbalizers.json").read_text())
    assert saved["backbone"]["model_type"] == "llava_onevision" and saved["layers"] == [1]
    assert (out / "checkpoint-2").is_dir()


def test_user_errors_are_one_line(tiny_pair, data_file, tmp_path):
    cfg = make_config(tiny_pair("qwen2_vl"), data_file)
    with pytest.raises(VlsiError, match="role must be") as err:
        run_verbalize(cfg, "judge", tmp_path / "out")
    assert "\n" not in str(err.value)
    cfg.teacher = str(tmp_path / "missing")
    with pytest.raises(VlsiError, match="model path not found") as err:
        run_verbalize(cfg, "teacher", tmp_path / "out")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("architecture", ["verb-ffn", "decoder"])
def test_checkpointed_transforms_give_the_same_loss_and_gradients_and_keep_less(tiny_pair, architecture):
    """``training.gradient_checkpointing`` recomputes each verbalizer transform in the backward:
    the same per-layer losses and gradients, fewer bytes kept for the backward."""
    from vlsi.method.verbalizer import capture_hidden_states, capture_layer_context
    from vlsi.train.stages.verbalize import VerbalizerTrainingModel

    backbone = load_backbone(tiny_pair().teacher)
    backbone.model.requires_grad_(False)
    ids = torch.randint(20, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    positions = prediction_positions(labels)
    torch.manual_seed(0)
    vset = VerbalizerSet(backbone, [1, 3], architecture).float()
    with torch.no_grad():
        for p in vset.parameters():
            p.normal_(0, 0.05)
    with torch.no_grad(), capture_layer_context(backbone) as context, \
            capture_hidden_states(backbone, vset.layers) as states:
        backbone.model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=torch.zeros_like(ids))

    results = {}
    for checkpointed in (False, True):
        model = VerbalizerTrainingModel(vset, chunk_size=5, checkpoint_transforms=checkpointed)
        vset.zero_grad(set_to_none=True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            losses = model(hidden_states=states, positions=positions, targets=response_targets(labels, positions),
                           context=context)
        losses.sum().backward()
        results[checkpointed] = (losses.detach(), [p.grad.clone() for p in vset.parameters()], sum(kept))
    (plain, plain_grads, plain_bytes), (ckpt, ckpt_grads, ckpt_bytes) = results[False], results[True]
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
    for a, b in zip(ckpt_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert ckpt_bytes < plain_bytes, (ckpt_bytes, plain_bytes)
