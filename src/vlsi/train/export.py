"""Export the trained student as a stock Hugging Face checkpoint (docs/method.md#sft-and-export).

The exported directory is what any ``transformers`` user loads, with nothing of this package::

    model = AutoModelForImageTextToText.from_pretrained("runs/x/4-sft/model")
    tokenizer = AutoTokenizer.from_pretrained("runs/x/4-sft/model")          # + chat template
    images = AutoImageProcessor.from_pretrained("runs/x/4-sft/model")

It holds:

* ``config.json``, ``generation_config.json`` and ``model*.safetensors`` of the student with its
  LoRA merged (``merge_and_unload``): the student's own architecture and dtype, no adapter, no
  custom code (``auto_map``);
* the student's tokenizer files, chat template and image-processor config, copied byte for byte
  from the student's source directory (copying, rather than re-saving a loaded processor, keeps
  the source's processor class and settings exactly: the PIL backend used in training is only
  a loading choice);
* ``verbalizers/verbalizers.{safetensors,json}``: the student's verbalizers, beside the weights
  and separate from them (``from_pretrained`` never reads a sub-directory).

The directory is written under a temporary name next to ``out_dir`` and renamed into place when
complete, so a killed export never leaves a directory that looks finished.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import CONFIG_NAME as VERBALIZER_CONFIG
from vlsi.method.verbalizer import WEIGHTS_NAME as VERBALIZER_WEIGHTS
from vlsi.models.backbones import checkpoint_dir

VERBALIZER_DIR = "verbalizers"

# Files of a Hugging Face VLM checkpoint that are not the model itself: tokenizer, chat template,
# image (and video) processor. Whatever of these the source has is copied.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
)
PROCESSOR_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def export_student(
    model: nn.Module,
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    verbalizers_dir: str | Path | None = None,
) -> Path:
    """Write the student as a stock HF checkpoint directory ``out_dir`` and return its path.

    Args:
        model: the student, a ``peft.PeftModel`` (its LoRA is merged into the base weights; the
            model is modified in place) or a plain ``...ForConditionalGeneration``.
        source_dir: the student's original checkpoint directory; its tokenizer, chat template
            and image-processor files are copied.
        out_dir: the directory to create; an existing one is replaced whole.
        verbalizers_dir: a directory with ``verbalizers.safetensors`` + ``verbalizers.json``,
            copied to ``out_dir/verbalizers/``.
    """
    src = checkpoint_dir(source_dir)
    out = Path(out_dir)
    extra = _processor_files(src)
    verbalizer_files = _verbalizer_files(verbalizers_dir) if verbalizers_dir is not None else []
    model = _merged(model)

    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)  # config.json, generation_config.json, safetensors shards
    for name in extra:
        shutil.copy2(src / name, tmp / name)
    if verbalizer_files:
        (tmp / VERBALIZER_DIR).mkdir()
        for f in verbalizer_files:
            shutil.copy2(f, tmp / VERBALIZER_DIR / f.name)
    _replace_dir(tmp, out)
    return out


def _processor_files(src: Path) -> list[str]:
    names = [n for n in (*TOKENIZER_FILES, *PROCESSOR_FILES) if (src / n).is_file()]
    if not any(n in TOKENIZER_FILES for n in names):
        raise VlsiError(f"{src}: no tokenizer files to export (looked for {', '.join(TOKENIZER_FILES)})")
    if "preprocessor_config.json" not in names:
        raise VlsiError(f"{src}: no preprocessor_config.json (image processor) to export")
    return names


def _verbalizer_files(path: str | Path) -> list[Path]:
    d = Path(path)
    files = [d / VERBALIZER_WEIGHTS, d / VERBALIZER_CONFIG]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise VlsiError(f"{d}: no {' + '.join(missing)} (student verbalizers not found)")
    return files


def _merged(model: nn.Module) -> Any:
    """The base model with any LoRA merged in; refuses to export leftover adapter layers."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    leftover = [n for n, _ in model.named_parameters() if "lora_" in n]
    if leftover:
        raise VlsiError(f"export: adapter parameters remain after merging ({leftover[0]}, ...)")
    return model


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is moved aside first, then deleted."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
