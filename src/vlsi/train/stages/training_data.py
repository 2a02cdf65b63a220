"""The training data of a stage: scanned once per process, skips reported wherever it is read.

:func:`load_training_data` builds the dataset with the model's tokenizer, chat template and
image processor. Scanning (reading, validating and encoding every record) is done once per
process for the same files, settings and preprocessing files, so the steps of ``vlsi distill``
or ``vlsi demo`` that read one dataset share the scan; a changed file (size or mtime) is
scanned again. :func:`report_skips` puts the counts by reason and the first skipped ids on the
console and into ``metrics.jsonl``; the stage copies them into ``step_complete.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.files import append_jsonl, read_jsonl
from vlsi.models.backbones import ImageEncoder, load_tokenizer
from vlsi.train.config import DataConfig
from vlsi.train.identity import preprocessing_digest

_SCANNED: dict[tuple, VisualInstructionDataset] = {}
_SCANNED_KEEP = 2

def _scan_key(data: DataConfig, model_dir: str | Path, family: Any) -> tuple:
    """Everything a scanned dataset depends on: the files as they are now (path, size, mtime),
    the settings, the family and the model's tokenizer, chat template and processor files."""
    def stat(path: str | Path) -> tuple:
        p = Path(path).resolve()
        st = p.stat() if p.is_file() else None
        return (str(p), st.st_size if st else None, st.st_mtime_ns if st else None)

    root = str(Path(data.image_root).resolve()) if data.image_root else None
    return (tuple(stat(f) for f in data.train), root, data.max_length, data.strict, data.min_pixels,
            data.max_pixels, family, preprocessing_digest(model_dir))


def load_training_data(data: DataConfig, model_dir: str | Path
                       ) -> tuple[VisualInstructionDataset, VisionLanguageCollator, Any]:
    """Dataset, collator and tokenizer of ``data.train`` with ``model_dir``'s preprocessing."""
    tokenizer = load_tokenizer(model_dir)
    images = ImageEncoder.from_pretrained(model_dir, min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    key = _scan_key(data, model_dir, images.family)
    dataset = _SCANNED.get(key)
    if dataset is None:
        dataset = VisualInstructionDataset.from_files(
            data.train, tokenizer, images, image_root=data.image_root, max_length=data.max_length,
            strict=data.strict)
        while len(_SCANNED) >= _SCANNED_KEEP:
            _SCANNED.pop(next(iter(_SCANNED)))
        _SCANNED[key] = dataset
    collator = VisionLanguageCollator.for_tokenizer(images.family, tokenizer)
    return dataset, collator, tokenizer


def report_skips(dataset: VisualInstructionDataset, stage: str, metrics: Path | None) -> dict[str, Any]:
    """Print the data summary's headline; record it once in ``metrics`` (main process)."""
    summary = dataset.summary
    print(f"{stage}: data: {summary.headline()}", flush=True)
    record = summary.record()
    if metrics is not None and not any("data_records" in r for r in read_jsonl(metrics)):
        append_jsonl(metrics, {"stage": stage, "step": 0, **record})
    return record
