"""Pre-flight refuses a step that cannot fit the GPU under the launch's engine (faked CUDA, meta shapes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from helpers import REPO, free_port
from vlsi.errors import VlsiError
from vlsi.models.shapes import shape_from_name
from vlsi.train.config import load_config
from vlsi.train.plan import STEPS, USABLE_FRACTION, gb, plan_step, setup_from_config
from vlsi.train.preflight import check_gpu_memory, check_run, launch_engine

GPU = 80 * 10**9


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every process sees an 80 GB CUDA GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GPU, GPU))


def _launch(engine: str, processes: int = 8) -> SimpleNamespace:
    """What :func:`launch_engine` reads of ``TrainingArguments`` under ``accelerate launch``."""
    stage = {"zero2": 2, "zero3": 3}.get(engine)
    return SimpleNamespace(use_cpu=False, device="cuda:0", world_size=processes,
                           deepspeed_plugin=SimpleNamespace(zero_stage=stage) if stage else None,
                           fsdp_plugin_args={} if engine == "fsdp" else None)


def _72b_to_7b():
    cfg = load_config(REPO / "configs/qwen2vl-72b-to-7b.yaml")
    teacher, student = shape_from_name("qwen2-vl-72b"), shape_from_name("qwen2-vl-7b")
    teacher.target_layers, student.target_layers = list(range(1, 79, 4)), list(range(1, 27, 4))
    return cfg, teacher, student


def test_the_72b_config_under_ddp_is_refused_with_the_plans_numbers(fake_gpu):
    cfg, teacher, student = _72b_to_7b()
    with pytest.raises(VlsiError) as err:
        check_gpu_memory(cfg, STEPS, teacher, student, _launch("ddp"))
    message = str(err.value)
    planned = plan_step("teacher-verbalize", teacher, student, setup_from_config(cfg, 8, "ddp"))
    assert message.startswith(f"teacher-verbalize: predicted {gb(planned.total)} per GPU under DDP x 8 "
                              f"(teacher weights {gb(planned.parts['teacher weights'])})")
    assert f"{gb(USABLE_FRACTION * GPU)} usable of this GPU's {gb(GPU)}" in message
    assert message.endswith("zero3 would fit (accelerate_configs/deepspeed_zero3.yaml)") and "\n" not in message
    with pytest.raises(VlsiError, match=r"^interact: predicted .* under ZeRO-2 x 8 .*zero3 would fit"):
        check_gpu_memory(cfg, ("student-verbalize", "interact", "sft"), teacher, student, _launch("zero2"))


def test_the_72b_config_passes_under_zero3_and_fsdp(fake_gpu):
    cfg, teacher, student = _72b_to_7b()
    for engine in ("zero3", "fsdp"):
        assert check_gpu_memory(cfg, STEPS, teacher, student, _launch(engine)) is None
    # the student's own steps fit one GPU under DDP
    assert check_gpu_memory(cfg, ("student-verbalize", "sft"), None, student, _launch("ddp")) is None


def test_no_engine_fits_one_gpu(fake_gpu):
    cfg, teacher, student = _72b_to_7b()
    with pytest.raises(VlsiError, match=r"^interact: .* under one process .*; no engine fits 1 such GPU"):
        check_gpu_memory(cfg, ("interact",), teacher, student, _launch("ddp", processes=1))


def test_nothing_is_checked_on_a_cpu(monkeypatch):
    cfg, teacher, student = _72b_to_7b()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("mem_get_info on a CPU run"))
    assert check_gpu_memory(cfg, STEPS, teacher, student, _launch("ddp")) is None


def test_the_engine_comes_from_the_training_arguments(monkeypatch, tmp_path):
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    def engine(**env: str) -> tuple[str, str]:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            return launch_engine(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
        finally:
            unset_hf_deepspeed_config()  # TrainingArguments registers the DeepSpeed config globally
            for key in env:
                monkeypatch.delenv(key)

    assert engine() == ("ddp", "one process")
    assert engine(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3") == ("zero3", "ZeRO-3")
    assert engine(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="1") == ("ddp", "ZeRO-1")
    assert engine(ACCELERATE_USE_FSDP="true") == ("fsdp", "FSDP")


def test_check_run_and_the_verbalize_step_refuse_before_loading(monkeypatch, tmp_path, tiny_config):
    """With a (faked) GPU too small, pre-flight names the step; the verbalize step refuses before
    its backbone loads. The tiny models' shapes come from their checkpoints on the meta device."""
    import vlsi.train.preflight
    import vlsi.train.stages.verbalize
    from vlsi.train.stages.verbalize import run_verbalize

    cfg = tiny_config(tmp_path / "run")
    assert check_run(cfg, ("sft",)).student is not None  # on this CPU: no budget, nothing refused
    monkeypatch.setattr(vlsi.train.preflight, "gpu_memory", lambda args: 10**6)
    monkeypatch.setattr(vlsi.train.stages.verbalize, "gpu_memory", lambda args: 10**6)
    monkeypatch.setattr(vlsi.train.stages.verbalize, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    with pytest.raises(VlsiError, match=r"^sft: predicted .* per GPU under one process .* of this GPU's 0\.0 GB"):
        check_run(cfg, ("sft",))
    assert check_run(cfg, ("sft",), memory=False).student is not None
    with pytest.raises(VlsiError, match=r"^teacher-verbalize: predicted .* under one process"):
        run_verbalize(cfg, "teacher", tmp_path / "teacher-verbalize")


torch.set_num_threads(1)


def test_the_plan_builds_its_meta_models_inside_a_zero3_launch(monkeypatch, tmp_path, tiny_pair):
    """A ZeRO-3 launch's TrainingArguments make transformers build every model inside
    ``deepspeed.zero.Init``, which cannot initialise meta tensors: the GPU memory check of
    ``vlsi interact`` under deepspeed_zero3.yaml stopped there on a GPU. The plan's shapes are
    built outside it, and the launch's DeepSpeed config is back afterwards."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from vlsi.models.shapes import shape_from_checkpoint

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():  # a one-process launch's environment
        monkeypatch.setenv(key, value)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    try:
        assert is_deepspeed_zero3_enabled()
        shape = shape_from_checkpoint(tiny_pair().teacher)
        assert shape.parameters > 0 and shape.num_layers > 0
        assert is_deepspeed_zero3_enabled() and launch_engine(args)[0] == "zero3"
    finally:
        unset_hf_deepspeed_config()
