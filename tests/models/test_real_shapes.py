"""vlsi.models.real_shapes: the published Qwen2-VL shapes, and an interaction step at the real vocabulary.

Parameter counts come from meta-device instances (no memory); the published totals are
2.21B (2B), 8.29B (7B) and 73.4B (72B) parameters (the model cards' figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY_CONFIG
from vlsi.models.real_shapes import real_shape_config, save_real_shape_pair
from vlsi.models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(512)


@pytest.mark.parametrize("size, layers, published", [("2b", 28, 2.21e9), ("7b", 28, 8.29e9), ("72b", 80, 73.4e9)])
def test_full_depth_parameter_counts_are_the_published_ones(size, layers, published, tokenizer):
    from transformers import AutoModelForImageTextToText

    config = real_shape_config(size, tokenizer, num_layers=layers)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    count = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
    assert count == pytest.approx(published, rel=0.005)


def test_shapes_follow_the_published_configs(tokenizer):
    teacher = real_shape_config("7b", tokenizer, num_layers=2)
    student = real_shape_config("2b", tokenizer, num_layers=2)
    assert (teacher.text_config.hidden_size, teacher.text_config.vocab_size) == (3584, 152064)
    assert (student.text_config.hidden_size, student.text_config.vocab_size) == (1536, 151936)
    assert student.tie_word_embeddings and not teacher.tie_word_embeddings
    assert (teacher.vision_config.depth, teacher.vision_config.embed_dim, teacher.vision_config.hidden_size) == (32, 1280, 3584)
    assert teacher.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")


@pytest.mark.slow
def test_interaction_step_at_the_real_vocabulary(tmp_path):
    """A narrow pair (width 64 / 32, one vision block) with the real LM-head rows: the shared
    vocabulary is cut at the student's 151,936, and LoRA lands on the LM's projections only."""
    from safetensors import safe_open

    from vlsi.data.synthetic import SyntheticConfig, generate_dataset
    from vlsi.method.verbalizer import VerbalizerSet
    from vlsi.models.backbones import load_backbone

    synth_dir = tmp_path / "synth"
    generate_dataset(synth_dir, SyntheticConfig(seed=0, num_train=4, num_eval=1), overwrite=True)

    teacher, student = save_real_shape_pair(tmp_path / "pair", teacher_layers=4, student_layers=3, width=64,
                                            vision_depth=1, dtype=torch.float32)
    verbalizers = [VerbalizerSet(load_backbone(m)).save(tmp_path / name) for m, name in ((teacher, "vt"), (student, "vs"))]
    out = tmp_path / "interact"
    overrides = {"teacher": str(teacher), "student": str(student), "output_dir": str(tmp_path / "run"),
                 "data.train": [str(synth_dir / "train.json")], "data.image_root": str(synth_dir),
                 "interact.max_steps": 1, "interact.per_device_train_batch_size": 2}
    settings = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "vlsi.cli", "interact", str(TINY_CONFIG),
                           "--teacher-verbalizers", str(verbalizers[0]), "--student-verbalizers", str(verbalizers[1]),
                           "--out", str(out), *settings], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "step_complete.json").read_text())["shared_vocab"] == 151936
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        modules = {k.rsplit(".lora_", 1)[0] for k in f.keys()}
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert modules == {f"base_model.model.model.language_model.layers.{i}.{p}" for i in range(3) for p in projections}
