"""Qwen2-VL checkpoints of the paper's real shapes with random weights, built locally.

Nothing can be downloaded here, so measurements at real widths and vocabularies use models
built from the published configurations (``config.json`` of ``Qwen/Qwen2-VL-2B-Instruct``,
``-7B-Instruct`` and ``-72B-Instruct`` on the Hugging Face hub): the exact language-model
widths, heads, MLP sizes and LM-head rows, and the exact 32-block, 1280-wide vision tower,
with fewer decoder layers (``num_layers``) so that a pair fits a 24 GB CPU machine. Special
token ids and the tokenizer are the tiny ones (:func:`vlsi.models.tiny.build_tiny_tokenizer`): the
LM heads keep their real 151,936 / 152,064 rows past the tokenizer, as real checkpoints pad
theirs, so the shared vocabulary is cut at 151,936 exactly as for the real pair. The image
processor is the tiny one (56 to 112 pixels a side), which bounds the vision tower's cost.

``width`` replaces the language model's width (heads kept at head_dim 128 where it divides,
else 4 heads) for narrow real-vocabulary models in the test suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Language models of Qwen2-VL (text part of config.json).
QWEN2_VL_TEXT: dict[str, dict[str, Any]] = {
    "2b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
               num_hidden_layers=28, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               num_hidden_layers=28, vocab_size=152064, tie_word_embeddings=False),
    "72b": dict(hidden_size=8192, intermediate_size=29568, num_attention_heads=64, num_key_value_heads=8,
                num_hidden_layers=80, vocab_size=152064, tie_word_embeddings=False),
}
# The vision tower (the same for the three sizes; its output width is the LM's).
QWEN2_VL_VISION: dict[str, Any] = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, in_chans=3,
                                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN2_VL_ROPE: dict[str, Any] = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}


def real_shape_config(size: str, tokenizer: Any, *, num_layers: int, width: int | None = None,
                      vision_depth: int | None = None) -> Any:
    """A ``Qwen2VLConfig`` of Qwen2-VL-``size`` (``2b``, ``7b``, ``72b``) with ``num_layers``
    decoder layers; ``width`` / ``vision_depth`` override the LM width / vision depth."""
    from transformers import Qwen2VLConfig

    from vlsi.models.tiny import SPECIAL_TOKENS, mrope_section

    if size not in QWEN2_VL_TEXT:
        raise ValueError(f"unknown Qwen2-VL size {size!r}; known: {', '.join(QWEN2_VL_TEXT)}")
    text = dict(QWEN2_VL_TEXT[size], num_hidden_layers=num_layers, rms_norm_eps=1e-6,
                max_position_embeddings=32768)
    rope = dict(QWEN2_VL_ROPE)
    if width is not None:
        heads = width // 128 if width % 128 == 0 else 4
        text.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=heads,
                    num_key_value_heads=heads // 4 if heads % 4 == 0 else 1)
        rope["mrope_section"] = mrope_section(width // heads)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters=rope)
    vision = dict(QWEN2_VL_VISION, hidden_size=text["hidden_size"])
    if vision_depth is not None:
        vision["depth"] = vision_depth
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"],
                         tie_word_embeddings=text["tie_word_embeddings"])


def save_real_shape_checkpoint(out_dir: str | Path, size: str, tokenizer: Any, *, num_layers: int,
                               dtype: torch.dtype = torch.bfloat16, width: int | None = None,
                               vision_depth: int | None = None, seed: int = 0) -> Path:
    """Build a random-initialised Qwen2-VL-``size`` of ``num_layers`` layers in ``dtype`` and
    save it as a complete checkpoint directory (weights, tokenizer, image processor)."""
    from transformers import AutoModelForImageTextToText

    from vlsi.models.tiny import chat_template, tiny_image_processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = real_shape_config(size, tokenizer, num_layers=num_layers, width=width, vision_depth=vision_depth)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    tokenizer.chat_template = chat_template("qwen2_vl")
    tokenizer.save_pretrained(out)
    tiny_image_processor("qwen2_vl").save_pretrained(out)
    return out


def save_real_shape_pair(out_dir: str | Path, *, teacher: str = "7b", student: str = "2b",
                         teacher_layers: int = 4, student_layers: int = 3, width: int | None = None,
                         vision_depth: int | None = None, dtype: torch.dtype = torch.bfloat16) -> tuple[Path, Path]:
    """``out_dir/{teacher,student}`` of the real shapes (one tiny tokenizer for both); a pair
    already saved there is reused. Returns the two directories."""
    from vlsi.models.tiny import build_tiny_tokenizer

    out = Path(out_dir)
    dirs = (out / "teacher", out / "student")
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    tokenizer = build_tiny_tokenizer(512)
    save_real_shape_checkpoint(dirs[0], teacher, tokenizer, num_layers=teacher_layers, dtype=dtype,
                               width=width, vision_depth=vision_depth, seed=0)
    save_real_shape_checkpoint(dirs[1], student, tokenizer, num_layers=student_layers, dtype=dtype,
                               width=None if width is None else width // 2, vision_depth=vision_depth, seed=1)
    return dirs
