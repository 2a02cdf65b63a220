"""``vlsi eval``: multiple-choice accuracy and short-answer exact match on a checkpoint.

Reads the project's JSON/JSONL format (LLaVA or messages records; the last assistant turn is
the reference, optional ``category``, ``options`` and ``form`` fields as written by
``vlsi data synth``) and MMBench-style TSV files (columns ``question``, ``A``..``D``,
``answer``, base64 ``image``, optional ``hint``, ``category``, ``index``). Generation is
batched greedy decoding (:mod:`vlsi.tools.inference`).

Scoring:
  * multiple choice (a record with ``options``, ``form: "mc"``, or every TSV row): the
    predicted letter is extracted from the response (:func:`extract_choice`, robust to
    "The answer is (B).", "B. blue", "b"), or, failing that, the one option whose text the
    response names; correct when it equals the reference letter.
  * short answer: normalised exact match (:func:`normalize_answer`: case, punctuation,
    articles, whitespace, number words to digits).

Writes one JSON line per item to the predictions file (id, category, form, prompt,
prediction, reference, extracted letter, correct) and returns/prints overall, per-category and
per-form accuracy.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import string
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from tqdm.auto import tqdm

from vlsi.data.records import (
                               BAD_RECORD,
                               IMAGE_UNREADABLE,
                               NO_ASSISTANT,
                               Rejected,
                               Sample,
                               Skip,
                               iter_parsed,
                               )
from vlsi.errors import DataError
from vlsi.tools.inference import Generator, Prompt, resolve_device

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


# -- scoring ---------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, number words as digits, one space."""
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


_LEAD = re.compile(r"^\s*\(?([A-Za-z])\s*(?:[).:,]|$|\s)")
_STATED = re.compile(  # the letter itself must be upper case: "the answer is a star" is no "A"
    r"(?i:answer|option|choice)\s*(?i:is|would be|should be)?\s*[:\-]?\s*\(?([A-Z])\b\)?"
)
_PAREN = re.compile(r"\(([A-Za-z])\)")


def extract_choice(text: str, num_options: int, options: list[str] | None = None) -> str | None:
    """The option letter a response names, or ``None``.

    In order: a leading letter ("B", "B.", "(B) blue", "b"); a stated answer ("The answer is
    (B).", "Answer: C"); a single parenthesised letter anywhere; the one option text the
    response names (when ``options`` are given, case- and punctuation-insensitive). Letters
    beyond ``num_options`` do not count; "A" read as the article ("A circle") is rejected
    when it is not followed by punctuation and the response is longer than the letter.
    """
    valid = set(LETTERS[:num_options])
    stripped = text.strip()
    lead = _LEAD.match(stripped)
    if lead and lead.group(1).upper() in valid:
        letter = lead.group(1).upper()
        rest = stripped[lead.end():].strip()
        is_article = lead.group(1) in "aA" and rest and not re.match(r"^\s*\(?[aA]\s*[).:,]", stripped)
        if not is_article:
            return letter
    for match in _STATED.finditer(stripped):
        if match.group(1).upper() in valid:
            return match.group(1).upper()
    parens = {m.upper() for m in _PAREN.findall(stripped) if m.upper() in valid}
    if len(parens) == 1:
        return parens.pop()
    if options:
        said = normalize_answer(stripped)
        named = [LETTERS[i] for i, opt in enumerate(options[:num_options])
                 if normalize_answer(opt) and re.search(rf"\b{re.escape(normalize_answer(opt))}\b", said)]
        if len(named) == 1:
            return named[0]
    return None


# -- items -----------------------------------------------------------------------------------

@dataclass
class EvalItem:
    """One question: the prompt up to the reply, the reference and how to score it."""

    id: str
    prompt: Prompt
    reference: str
    category: str = "all"
    options: list[str] | None = None  # multiple choice: option texts in letter order
    unordered: bool = False  # the reference is a comma-separated list, right in any order

    @property
    def form(self) -> str:
        return "mc" if self.options else "short"


def mc_question(question: str, options: list[str], hint: str | None = None) -> str:
    """MMBench-style prompt: hint, question, "A. ..." lines, the letter instruction."""
    lines = [hint.strip()] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    lines.append(MC_INSTRUCTION)
    return "\n".join(lines)


def _text_of(turn: dict[str, Any]) -> str:
    return "".join(c.get("text", "") for c in turn["content"] if c["type"] == "text").strip()


def _prompt_text(turn: dict[str, Any]) -> str:
    """A user turn's content back as text with ``<image>`` tags."""
    return "".join("<image>" if c["type"] == "image" else c.get("text", "") for c in turn["content"])


def items_from_json(path: str | Path, image_root: str | Path | None = None
                    ) -> tuple[list[EvalItem], list[Skip]]:
    """Questions from a project JSON/JSONL file: each record's last assistant turn is the reference.

    Bad records (the data pipeline's checks) and records whose last assistant turn does not
    answer a user turn are skipped, with reasons.
    """
    items: list[EvalItem] = []
    skips: list[Skip] = []
    for sample_id, record, parsed in iter_parsed(path, image_root):
        try:
            if isinstance(parsed, Rejected):
                raise parsed
            items.append(_item_from_sample(parsed, record))
        except Rejected as err:
            skips.append(Skip(sample_id, err.reason, err.kind))
    return items, skips


def _item_from_sample(sample: Sample, record: dict[str, Any]) -> EvalItem:
    turns = sample.turns
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None or last == 0 or turns[last - 1]["role"] != "user":
        raise Rejected("the last assistant turn does not answer a user turn", NO_ASSISTANT)
    images_before = sum(c["type"] == "image" for t in turns[:last] for c in t["content"])
    options = record.get("options")
    if options is not None and not (isinstance(options, list) and all(isinstance(o, str) for o in options)):
        raise Rejected("options must be a list of strings", BAD_RECORD)
    prompt = Prompt(_prompt_text(turns[last - 1]), list(sample.images[:images_before]),
                    turns=turns[:last - 1])
    return EvalItem(sample.id, prompt, _text_of(turns[last]), str(record.get("category", "all")),
                    options or None, bool(record.get("unordered", False)))


def items_from_tsv(path: str | Path) -> tuple[list[EvalItem], list[Skip]]:
    """Questions from an MMBench-style TSV (one base64 image per row, options in columns A-D...)."""
    csv.field_size_limit(sys.maxsize)
    items, skips = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = {"question", "answer", "A", "B"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: TSV lacks column(s) {', '.join(sorted(missing))}")
        for row_no, row in enumerate(reader, start=1):
            row_id = str(row.get("index") or row_no)
            options = []
            for letter in LETTERS:
                value = row.get(letter)
                if value is None or not value.strip() or value.strip().lower() == "nan":
                    break
                options.append(value.strip())
            answer = (row.get("answer") or "").strip().upper()
            if answer not in LETTERS[:len(options)]:
                skips.append(Skip(row_id, f"answer {answer!r} is not one of the options", BAD_RECORD))
                continue
            images = []
            if row.get("image"):
                try:
                    im = Image.open(io.BytesIO(base64.b64decode(row["image"])))
                    im.load()
                    images.append(im.convert("RGB"))
                except (ValueError, OSError) as err:
                    skips.append(Skip(row_id, f"image unreadable ({err})", IMAGE_UNREADABLE))
                    continue
            hint = row.get("hint")
            hint = None if hint is None or hint.strip().lower() == "nan" else hint
            text = mc_question(row["question"], options, hint)
            items.append(EvalItem(row_id, Prompt(text, images), answer,
                                  str(row.get("category") or "all"), options))
    return items, skips


def load_items(path: str | Path, image_root: str | Path | None = None
               ) -> tuple[list[EvalItem], list[Skip]]:
    """Items from a ``.tsv`` (MMBench style) or a JSON/JSONL file; an empty result is an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"evaluation data not found: {path}")
    items, skips = items_from_tsv(path) if path.suffix == ".tsv" else items_from_json(path, image_root)
    if not items:
        raise DataError(f"no usable question in {path} ({len(skips)} skipped)")
    return items, skips


# -- evaluation ------------------------------------------------------------------------------

@dataclass
class EvalResult:
    accuracy: float
    count: int
    by_category: dict[str, float] = field(default_factory=dict)
    by_form: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    predictions: list[dict[str, Any]] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "count": self.count, "by_category": self.by_category,
                "by_form": self.by_form, "skipped": self.skipped}


def score(item: EvalItem, prediction: str) -> dict[str, Any]:
    """The prediction record of one item (``correct`` and, for MC, the extracted letter)."""
    row: dict[str, Any] = {"id": item.id, "category": item.category, "form": item.form,
                           "prompt": item.prompt.text, "prediction": prediction,
                           "reference": item.reference}
    if item.options:
        letter = extract_choice(prediction, len(item.options), item.options)
        row["extracted"] = letter
        row["correct"] = letter is not None and letter == item.reference.strip().upper()
    elif item.unordered:
        row["correct"] = list_items(prediction) == list_items(item.reference)
    else:
        row["correct"] = normalize_answer(prediction) == normalize_answer(item.reference)
    return row


def list_items(text: str) -> list[str]:
    """A comma-separated answer as its sorted, normalised items (a multiset: order-free)."""
    return sorted(filter(None, (normalize_answer(part) for part in text.split(","))))


def evaluate(generator: Generator, items: list[EvalItem], *, batch_size: int = 32,
             max_new_tokens: int = 16, num_beams: int = 1, progress: bool = True,
             desc: str = "eval",
             on_prediction: Callable[[dict[str, Any]], None] | None = None) -> EvalResult:
    """Generate (greedy; beam search with ``num_beams`` > 1) for every item and score it.

    An item whose image cannot be opened or decoded is a counted skip (``EvalResult.skipped``,
    its id and reason in ``EvalResult.skips``); the others are still evaluated.
    """
    rows: list[dict[str, Any]] = []
    skips: list[Skip] = []
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        chunk = []
        for item in items[start:start + batch_size]:
            problem = unreadable_image(item)
            if problem:
                skips.append(Skip(item.id, problem, IMAGE_UNREADABLE))
            else:
                chunk.append(item)
        if not chunk:
            bar.update(min(batch_size, len(items) - start))
            continue
        answers = generator.generate([it.prompt for it in chunk], max_new_tokens=max_new_tokens,
                                     num_beams=num_beams, batch_size=batch_size)
        for it, answer in zip(chunk, answers):
            rows.append(score(it, answer))
            if on_prediction:
                on_prediction(rows[-1])
        bar.update(min(batch_size, len(items) - start))
    bar.close()
    result = summarize(rows, skipped=len(skips))
    result.skips = skips
    return result


def unreadable_image(item: EvalItem) -> str | None:
    """Why an item's images cannot be used (``None``: they open and decode)."""
    for image in item.prompt.images:
        if isinstance(image, Image.Image):
            continue
        try:
            with Image.open(image) as im:
                im.load()
        except (OSError, ValueError) as err:
            return f"image unreadable: {image} ({type(err).__name__})"
    return None


def summarize(rows: list[dict[str, Any]], skipped: int = 0) -> EvalResult:
    def rate(group: dict[str, list[bool]]) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in sorted(group.items())}

    cats: dict[str, list[bool]] = defaultdict(list)
    forms: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        cats[row["category"]].append(row["correct"])
        forms[row["form"]].append(row["correct"])
    total = sum(row["correct"] for row in rows)
    return EvalResult(total / len(rows) if rows else 0.0, len(rows), rate(cats), rate(forms),
                      skipped, rows)


def format_result(result: EvalResult) -> str:
    lines = [f"accuracy {result.accuracy:.4f} ({sum(r['correct'] for r in result.predictions)}"
             f"/{result.count}; {result.skipped} skipped)"]
    for name, group in (("form", result.by_form), ("category", result.by_category)):
        for key, acc in group.items():
            lines.append(f"  {name} {key:<20} {acc:.4f}")
    return "\n".join(lines)


def default_predictions_path(model: str | Path, data: str | Path) -> Path:
    """``runs/eval/<model dir>-<data file>.predictions.jsonl``: never inside the model."""
    return Path("runs") / "eval" / f"{Path(model).resolve().name}-{Path(data).stem}.predictions.jsonl"


def run_eval(model: str | Path, data: str | Path, *, image_root: str | Path | None = None,
             out: str | Path | None = None, batch_size: int = 32, max_new_tokens: int = 16,
             limit: int | None = None, device: str | None = None) -> EvalResult:
    """``vlsi eval``: load, generate, score, write predictions (JSONL) and metrics (JSON).

    ``device``: as :func:`vlsi.tools.inference.resolve_device` (default: the GPU when there is one).
    """
    target, dtype = resolve_device(device)  # a bad --device fails before anything loads
    items, skips = load_items(data, image_root)
    if limit:
        items = items[:limit]
    generator = Generator.from_pretrained(model, dtype=dtype, device=target)
    result = evaluate(generator, items, batch_size=batch_size, max_new_tokens=max_new_tokens)
    skips = list(skips) + result.skips
    for skip in skips:
        print(f"skipped {skip}", file=sys.stderr)
    result.skipped = len(skips)
    out = Path(out) if out else default_predictions_path(model, data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in result.predictions), encoding="utf-8")
    out.with_suffix(".metrics.json").write_text(json.dumps(result.metrics(), indent=2) + "\n")
    print(format_result(result))
    print(f"predictions: {out}")
    return result
