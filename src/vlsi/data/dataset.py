"""A torch ``Dataset`` of visual-instruction conversations, validated once up front.

Example::

    tok = load_tokenizer(ckpt)
    images = ImageEncoder.from_pretrained(ckpt, max_pixels=512 * 28 * 28)
    ds = VisualInstructionDataset.from_files(["train.jsonl"], tok, images, max_length=4096)
    print(ds.summary.format())          # kept/skipped counts, each skipped id with its reason
    collate = VisionLanguageCollator.for_tokenizer(images.family, tok)
    batch = collate([ds[0], ds[1]])

``from_files`` reads every record, tokenises it, decodes and preprocesses its images once to
learn how many vision tokens each needs, and drops bad samples (see
:mod:`vlsi.data.records`), so a training run never meets a broken sample halfway through.
Image tensors are not kept: ``__getitem__`` decodes and preprocesses the images again (the
price is preprocessing each image twice; the memory of a preprocessed dataset is not paid).

Items are dicts (what a transformers ``Trainer`` passes to its data collator)::

    input_ids         LongTensor [T_c]     compact: one placeholder per image
    labels            LongTensor [T_c]     -100 outside assistant replies
    num_image_tokens  LongTensor [n]       vision tokens per image (n = 0 for text-only)
    pixel_values, image_grid_thw           Qwen families, when n > 0
    pixel_values, image_sizes              LLaVA-OneVision, when n > 0
    id                str

With a ``Trainer`` set ``TrainingArguments(remove_unused_columns=False)``: otherwise the
Trainer drops every key its model's ``forward`` does not name (``num_image_tokens``) before
the collator sees them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from vlsi.data.encode import DEFAULT_MAX_LENGTH, EncodedSample, SampleEncoder
from vlsi.data.records import Rejected, Skip, read_records, rejected
from vlsi.errors import DataError
from vlsi.models.backbones import ImageEncoder


@dataclass
class DataSummary:
    """What a scan kept and left out.

    Attributes:
        files: the data files read.
        num_records: records read (blank JSONL lines excluded).
        kept: samples in the dataset.
        skipped: every left-out record with its reason, in file order.
    """

    files: list[str]
    num_records: int
    kept: int
    skipped: list[Skip] = field(default_factory=list)

    @property
    def skipped_by_kind(self) -> dict[str, int]:
        return dict(Counter(s.kind for s in self.skipped))

    def record(self, first: int = 5) -> dict[str, Any]:
        """The counts as a JSON record: kept, skipped by reason, the first skipped ids."""
        return {"data_records": self.num_records, "data_kept": self.kept,
                "data_skipped": len(self.skipped), "data_skipped_by_reason": self.skipped_by_kind,
                "data_first_skipped": [s.id for s in self.skipped[:first]]}

    def headline(self, first: int = 3) -> str:
        """One line: ``kept 98 of 100 records; skipped 2 (image_not_found: 2; first: a, b)``."""
        line = f"kept {self.kept:,} of {self.num_records:,} records"
        if not self.skipped:
            return line + ", none skipped"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped_by_kind.items()))
        ids = ", ".join(s.id for s in self.skipped[:first])
        return f"{line}; skipped {len(self.skipped):,} ({kinds}; first: {ids})"

    def format(self) -> str:
        """Printable summary: counts, then one line per skipped sample."""
        lines = [f"kept {self.kept} of {self.num_records} records from {', '.join(self.files)}"]
        if self.skipped:
            kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.skipped_by_kind.items()))
            lines.append(f"skipped {len(self.skipped)} ({kinds}):")
            lines.extend(f"  {s}" for s in self.skipped)
        return "\n".join(lines)


def scan(
    paths: str | Path | Sequence[str | Path],
    encoder: SampleEncoder,
    image_root: str | Path | None = None,
    *,
    strict: bool = False,
) -> tuple[list[EncodedSample], DataSummary]:
    """Read, validate and encode every record; bad ones are skipped (strict: raise).

    Returns the encoded samples (possibly none) and the summary. Raises
    :class:`~vlsi.errors.DataError` for an unreadable file or, with ``strict``, the first bad
    record (one line: ``"<id>: <reason>"``).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DataError("no data files given")
    read = read_records(paths, image_root)  # not strict: strict stops at the first in order
    skipped: list[Skip] = []
    encoded: list[EncodedSample] = []
    for item in read.items:
        if isinstance(item, Skip):
            if strict:
                raise DataError(str(item))
            skipped.append(item)
            continue
        try:
            encoded.append(encoder.encode(item))
        except Rejected as err:
            skipped.append(rejected(item.id, err, strict))
    summary = DataSummary([str(p) for p in paths], read.num_records, len(encoded), skipped)
    return encoded, summary


class VisualInstructionDataset(Dataset):
    """Encoded conversations; ``__getitem__`` adds the image tensors (see module docstring)."""

    def __init__(self, samples: list[EncodedSample], encoder: SampleEncoder, summary: DataSummary):
        if not samples:
            raise DataError(
                f"no usable samples in {', '.join(summary.files)} "
                f"({len(summary.skipped)} of {summary.num_records} records skipped)"
            )
        self.samples = samples
        self.encoder = encoder
        self.summary = summary

    @classmethod
    def from_files(
        cls,
        paths: str | Path | Sequence[str | Path],
        tokenizer: Any,
        image_encoder: ImageEncoder,
        image_root: str | Path | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        strict: bool = False,
    ) -> VisualInstructionDataset:
        """Scan ``paths`` (JSON lists or JSONL) and build the dataset.

        Raises:
            DataError: unreadable file; strict mode and a bad record; no sample left.
        """
        encoder = SampleEncoder(tokenizer, image_encoder, max_length)
        samples, summary = scan(paths, encoder, image_root, strict=strict)
        return cls(samples, encoder, summary)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Expanded length of every sample (for length-grouped sampling)."""
        return [s.length for s in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        item: dict[str, Any] = {
            "id": s.id,
            "input_ids": torch.tensor(s.input_ids, dtype=torch.long),
            "labels": torch.tensor(s.labels, dtype=torch.long),
            "num_image_tokens": torch.tensor(s.num_image_tokens, dtype=torch.long),
        }
        if s.images:
            try:
                batch = self.encoder.image_batch(s.images)
            except Rejected as err:  # the file changed after the scan
                raise DataError(f"{s.id}: {err.reason}") from None
            if batch.num_tokens != s.num_image_tokens:
                raise DataError(f"{s.id}: images changed since the dataset was scanned")
            item.update(batch.tensors)
        return item
