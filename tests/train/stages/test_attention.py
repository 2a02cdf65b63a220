"""``attn_implementation``: every stage loads its models with the configured attention kernel,
and a kernel this machine cannot run is a one-line error before anything loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers.utils import logging

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import VerbalizerSet
from vlsi.models import backbones
from vlsi.train.stages import cache_teacher, interact, sft, verbalize

torch.set_num_threads(1)
logging.set_verbosity_error()
logging.disable_progress_bar()

STAGE_MODULES = (verbalize, interact, sft, cache_teacher)


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, str]]:
    """(model directory name, the loaded language model's attention kernel) of every stage load."""
    seen: list[tuple[str, str]] = []

    def load(path, **kwargs):
        backbone = backbones.load_backbone(path, **kwargs)
        seen.append((Path(path).name, backbone.text_config._attn_implementation))
        return backbone

    for module in STAGE_MODULES:
        monkeypatch.setattr(module, "load_backbone", load)
    return seen


def test_every_stage_loads_with_the_configured_kernel(loads, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, attn_implementation="eager", **{"training.max_steps": 1, "training.save_steps": 1})
    verbalizers = {role: VerbalizerSet(backbones.load_backbone(getattr(cfg, role))).save(tmp_path / f"{role}-verb")
                   for role in ("teacher", "student")}
    verbalize.run_verbalize(cfg, "student", tmp_path / "verbalize")
    interact.run_interact(cfg, tmp_path / "interact", teacher_verbalizers=verbalizers["teacher"],
                          student_verbalizers=verbalizers["student"])
    sft.run_sft(cfg, tmp_path / "sft")
    cache_teacher.run_cache_teacher(cfg, tmp_path / "cache", teacher_verbalizers=verbalizers["teacher"], top_k=4)
    assert loads == [("student", "eager"), ("student", "eager"), ("teacher", "eager"), ("student", "eager"),
                     ("teacher", "eager")]


def test_the_default_kernel_is_sdpa(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.attn_implementation == "sdpa"
    assert backbones.load_backbone(cfg.student).text_config._attn_implementation == "sdpa"


def test_flash_attention_without_its_package_stops_before_loading(loads, monkeypatch, tiny_config, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn"
                        else real_find_spec(name, *a))
    cfg = tiny_config(tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(VlsiError, match="^attn_implementation flash_attention_2 needs the flash_attn package") as err:
        verbalize.run_verbalize(cfg, "student", tmp_path / "verbalize")
    assert "\n" not in str(err.value) and loads == []


def test_flash_attention_needs_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # as if installed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VlsiError, match="^attn_implementation flash_attention_2 needs a CUDA GPU"):
        backbones.check_attn_implementation("flash_attention_2")
