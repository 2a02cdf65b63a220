"""``vlsi data check``: validate a dataset and report what training would see.

    vlsi data check train.jsonl [--model runs/tiny/student] [--image-root DIR] [--max-length 4096]
                                [--min-pixels N] [--max-pixels N] [--strict]

Without ``--model``: the structure only (JSON, roles, an assistant turn, ``<image>`` tags
against images, every image file present and decodable), with counts and every skipped sample
with its reason. With ``--model``: the same scan as training (:func:`vlsi.data.dataset.scan`:
the checkpoint's chat template, every image preprocessed, the length check) and token-length
statistics besides. Only the tokenizer, the config and the image processor are loaded, not the
weights. ``--strict`` stops at the first bad sample with a one-line error; a dataset with no
usable sample is an error (after the report).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from vlsi.cli_types import positive_int
from vlsi.data.dataset import scan
from vlsi.data.encode import DEFAULT_MAX_LENGTH, SampleEncoder
from vlsi.errors import DataError, VlsiError
from vlsi.models.backbones import ImageEncoder, load_tokenizer, read_model_type
from vlsi.models.families import family_for


def length_stats(values: Sequence[int]) -> dict[str, float] | None:
    """min / mean / p50 / p95 / max (nearest-rank percentiles); ``None`` for no values."""
    if not values:
        return None
    v = sorted(values)

    def pct(p: float) -> int:
        return v[max(0, math.ceil(p / 100 * len(v)) - 1)]

    return {"min": v[0], "mean": round(sum(v) / len(v), 1), "p50": pct(50), "p95": pct(95), "max": v[-1]}


def _load(model_dir: str | Path, min_pixels: int | None, max_pixels: int | None):
    """Tokenizer and bounded image encoder of a checkpoint, with one-line errors."""
    family_for(read_model_type(model_dir))  # clear errors for a wrong directory first
    try:
        tokenizer = load_tokenizer(model_dir)
        image_encoder = ImageEncoder.from_pretrained(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
    except VlsiError:
        raise
    except (OSError, ValueError, KeyError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise VlsiError(f"{model_dir}: cannot load tokenizer/image processor ({first_line})") from None
    return tokenizer, image_encoder


def check_data(
    path: str | Path | Sequence[str | Path],
    model_dir: str | Path,
    image_root: str | Path | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
    strict: bool = False,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> dict[str, Any]:
    """Scan a dataset as training would and return a report (a JSON-serialisable dict).

    Keys: ``files``, ``model``, ``max_length``, ``records``, ``kept``, ``skipped`` (count),
    ``skipped_by_kind`` ({kind: count}), ``skipped_samples`` ([{id, reason, kind}]),
    ``images`` (in kept samples), ``single_image``/``multi_image``/``text_only`` (kept samples
    by number of images), ``turns`` and ``replies`` (total turns and assistant turns),
    ``multi_turn`` (samples with more than one reply), ``length`` and ``supervised``
    (:func:`length_stats` of the expanded length and of the supervised-token count, ``None``
    when nothing is kept). An empty result is reported, not raised (the CLI raises).

    Raises:
        DataError: unreadable data file; in strict mode the first bad sample.
        VlsiError: the model directory cannot be loaded.
    """
    tokenizer, image_encoder = _load(model_dir, min_pixels, max_pixels)
    encoder = SampleEncoder(tokenizer, image_encoder, max_length)
    samples, summary = scan(path, encoder, image_root, strict=strict)
    n_images = [len(s.images) for s in samples]
    return {
        "files": summary.files,
        "model": str(model_dir),
        "max_length": max_length,
        "records": summary.num_records,
        "kept": summary.kept,
        "skipped": len(summary.skipped),
        "skipped_by_kind": summary.skipped_by_kind,
        "skipped_samples": [{"id": s.id, "reason": s.reason, "kind": s.kind} for s in summary.skipped],
        "images": sum(n_images),
        "single_image": sum(n == 1 for n in n_images),
        "multi_image": sum(n > 1 for n in n_images),
        "text_only": sum(n == 0 for n in n_images),
        "turns": sum(s.num_turns for s in samples),
        "replies": sum(s.num_replies for s in samples),
        "multi_turn": sum(s.num_replies > 1 for s in samples),
        "length": length_stats([s.length for s in samples]),
        "supervised": length_stats([s.num_supervised for s in samples]),
    }


def check_structure(path: str | Path | Sequence[str | Path], image_root: str | Path | None = None,
                    strict: bool = False) -> dict[str, Any]:
    """The model-free part of :func:`check_data`: records parsed, images opened and decoded.

    Same keys as :func:`check_data` except ``length`` and ``supervised`` (``None``) and
    ``model`` (``None``).
    """
    from PIL import Image

    from vlsi.data.records import IMAGE_UNREADABLE, Skip, read_records

    read = read_records(path, image_root, strict=strict)
    samples, skipped = [], list(read.skips)
    for sample in read.samples:
        try:
            for image in sample.images:
                with Image.open(image) as im:
                    im.load()
        except (OSError, ValueError) as err:
            skip = Skip(sample.id, f"image unreadable ({type(err).__name__})", IMAGE_UNREADABLE)
            if strict:
                raise DataError(str(skip)) from None
            skipped.append(skip)
            continue
        samples.append(sample)
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    n_images = [len(s.images) for s in samples]
    counts: dict[str, int] = {}
    for skip in skipped:
        counts[skip.kind] = counts.get(skip.kind, 0) + 1
    replies = [sum(t["role"] == "assistant" for t in s.turns) for s in samples]
    return {
        "files": [str(p) for p in paths], "model": None, "max_length": None,
        "records": read.num_records, "kept": len(samples), "skipped": len(skipped),
        "skipped_by_kind": counts,
        "skipped_samples": [{"id": k.id, "reason": k.reason, "kind": k.kind} for k in skipped],
        "images": sum(n_images), "single_image": sum(n == 1 for n in n_images),
        "multi_image": sum(n > 1 for n in n_images), "text_only": sum(n == 0 for n in n_images),
        "turns": sum(s.num_turns for s in samples), "replies": sum(replies),
        "multi_turn": sum(r > 1 for r in replies), "length": None, "supervised": None,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as printed by ``vlsi data check``."""
    r = report
    lines = [
        f"data: {', '.join(r['files'])}",
        (f"model: {r['model']} (max_length {r['max_length']})" if r["model"] else
         "model: none (structure and images only; --model DIR adds the chat template, lengths and tokens)"),
        f"records: {r['records']}  kept: {r['kept']}  skipped: {r['skipped']}",
        f"images: {r['images']}  (samples: {r['single_image']} single-image, "
        f"{r['multi_image']} multi-image, {r['text_only']} text-only)",
        f"turns: {r['turns']}  assistant replies: {r['replies']}  multi-turn samples: {r['multi_turn']}",
    ]
    if r["skipped_by_kind"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(r["skipped_by_kind"].items()))
        lines.append(f"skipped by reason: {kinds}")
        lines.append("skipped samples:")
        lines.extend(f"  {s['id']}: {s['reason']}" for s in r["skipped_samples"])
    for key, title in (("length", "tokens per sample (expanded)"), ("supervised", "supervised tokens")):
        if r["model"] is None:
            break
        stats = r[key]
        if stats is None:
            lines.append(f"{title}: no samples kept")
        else:
            lines.append(f"{title}: " + "  ".join(f"{k} {v}" for k, v in stats.items()))
    return "\n".join(lines)


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``check`` sub-command; its handler is stored as ``args.func``."""
    parser = subparsers.add_parser(
        "check", help="validate a dataset (structure; with --model also tokens) and print statistics",
        description="Parse FILE (LLaVA-style or messages-style JSON/JSONL) and open every image, "
                    "then print counts and every skipped sample with its reason; with --model, "
                    "apply its chat template and image processor too and print token statistics.")
    parser.add_argument("files", metavar="FILE", nargs="+", type=Path, help="JSON or JSONL data file(s)")
    parser.add_argument("--model", type=Path, metavar="DIR",
                        help="checkpoint directory (tokenizer, chat template, image processor)")
    parser.add_argument("--image-root", type=Path, metavar="DIR",
                        help="directory relative image paths start from (default: the data file's)")
    parser.add_argument("--max-length", type=positive_int, default=DEFAULT_MAX_LENGTH,
                        help=f"longest sample in tokens after image expansion (default {DEFAULT_MAX_LENGTH})")
    parser.add_argument("--min-pixels", type=positive_int, help="lower bound on image height*width")
    parser.add_argument("--max-pixels", type=positive_int, help="upper bound on image height*width")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    parser.set_defaults(func=run_check)
    return parser


def run_check(args: argparse.Namespace) -> int:
    """Handler of ``vlsi data check``: print the report; no usable sample is a DataError."""
    if args.model is None:
        report = check_structure(args.files, image_root=args.image_root, strict=args.strict)
    else:
        report = check_data(
            args.files, args.model, image_root=args.image_root, max_length=args.max_length,
            strict=args.strict, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        )
    print(format_report(report))
    if report["kept"] == 0:
        raise DataError(f"no usable samples in {', '.join(report['files'])} "
                        f"({report['skipped']} of {report['records']} records skipped)")
    return 0
