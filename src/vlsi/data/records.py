"""Read visual-instruction data files into normalised :class:`Sample` objects.

Two record layouts are accepted, in a JSON file holding a list of records or in a JSONL file
(one record per line; the first non-blank character decides: ``[`` means a JSON list):

LLaVA style::

    {"id": "0001", "image": "coco/1.jpg",            # a path, a list of paths, or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

``from`` is ``human``/``user``, ``gpt``/``assistant`` or ``system``.

Messages style (the Hugging Face / TRL layout)::

    {"id": "0002", "images": ["a.png", "b.png"],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                               {"type": "text", "text": "Compare them."}]},
                  {"role": "assistant", "content": "The left one is larger."}]}

``content`` is a string (with ``<image>`` tags, as in LLaVA) or a list of typed items.

Images are matched to placeholders in order of appearance. Relative image paths are resolved
against ``image_root`` (default: the data file's directory). **No tag at all**: when a record
has images but no ``<image>`` tag and no ``{"type": "image"}`` item, all its images go to the
start of the first user turn, the LLaVA convention (``DEFAULT_IMAGE_TOKEN + "\\n" + text``).
Any other difference between the number of placeholders and of images is an error.
Whitespace touching an ``<image>`` tag is dropped (``"<image>\\nWhat"`` -> image, ``"What"``):
chat templates write their own separator after an image.

A bad record never stops the read: it becomes a :class:`Skip` with the sample id and a short,
fixed-wording reason, e.g. ``malformed JSON line 12: Expecting value``, ``no assistant turn``,
``2 <image> tags but 1 image``, ``image not found: /data/x.png``. A record without ``id`` is
named ``"<file>:<line>"`` (JSONL, 1-based line) or ``"<file>:<index>"`` (JSON list, 0-based).
With ``strict=True`` the first bad record raises :class:`~vlsi.errors.DataError` with the
one-line message ``"<id>: <reason>"``. Decoding the images and tokenising happen later
(:mod:`vlsi.data.encode`); they add ``image unreadable: ...`` and ``too long: ...``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlsi.errors import DataError

IMAGE_TAG = "<image>"
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_TAG_SPLIT = re.compile(r"\s*<image>\s*")

# Skip kinds: a fixed key per failure, for counting skips by cause.
MALFORMED_JSON = "malformed_json"
BAD_RECORD = "bad_record"
NO_ASSISTANT = "no_assistant_turn"
IMAGE_COUNT = "image_count_mismatch"
IMAGE_NOT_FOUND = "image_not_found"
IMAGE_UNREADABLE = "image_unreadable"
TOO_LONG = "too_long"


@dataclass(frozen=True)
class Skip:
    """A record left out of the dataset.

    Attributes:
        id: the record's ``id`` or ``"<file>:<line or index>"``.
        reason: one line, fixed wording plus the details (e.g. ``no assistant turn``).
        kind: a fixed key for counting (``no_assistant_turn``, ``image_not_found``, ...).
    """

    id: str
    reason: str
    kind: str

    def __str__(self) -> str:
        return f"{self.id}: {self.reason}"


class Rejected(Exception):
    """Raised while reading or encoding one record; becomes a :class:`Skip`."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.reason = " ".join(reason.split())  # always one line
        self.kind = kind


@dataclass
class Sample:
    """One conversation, normalised.

    Attributes:
        id: record id (see module docstring for the default).
        turns: chat-template messages ``{"role": "system"|"user"|"assistant", "content":
            [{"type": "image"} | {"type": "text", "text": str}, ...]}``; image items appear
            in the order of ``images``.
        images: resolved image paths, one per image item.
    """

    id: str
    turns: list[dict[str, Any]]
    images: list[Path] = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        return len(self.turns)


@dataclass
class ReadResult:
    """Every record read, in file order, as a :class:`Sample` or a :class:`Skip`.

    ``num_records`` excludes blank JSONL lines.
    """

    items: list[Sample | Skip]

    @property
    def samples(self) -> list[Sample]:
        return [x for x in self.items if isinstance(x, Sample)]

    @property
    def skips(self) -> list[Skip]:
        return [x for x in self.items if isinstance(x, Skip)]

    @property
    def num_records(self) -> int:
        return len(self.items)


def rejected(sample_id: str, err: Rejected, strict: bool) -> Skip:
    """The :class:`Skip` for a rejected sample; in strict mode raise it as a one-line
    :class:`DataError` (``"<id>: <reason>"``) instead."""
    skip = Skip(sample_id, err.reason, err.kind)
    if strict:
        raise DataError(str(skip))
    return skip


def read_records(
    paths: str | Path | Sequence[str | Path],
    image_root: str | Path | None = None,
    *,
    strict: bool = False,
) -> ReadResult:
    """Read and validate every record of one or more JSON/JSONL files.

    Checks the structure, the roles, that there is an assistant turn, that placeholders and
    images pair up and that every image file exists. Images are not decoded here.

    Raises:
        DataError: a data file is missing or (JSON list files) does not parse; in strict
            mode, the first bad record.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    items: list[Sample | Skip] = []
    for path in paths:
        for sample_id, _record, parsed in iter_parsed(path, image_root):
            items.append(rejected(sample_id, parsed, strict) if isinstance(parsed, Rejected) else parsed)
    return ReadResult(items)


def iter_parsed(path: str | Path, image_root: str | Path | None = None
                ) -> Iterator[tuple[str, Any, Sample | Rejected]]:
    """``(sample id, raw record, Sample or the Rejected reason)`` for every record of ``path``.

    Image paths resolve against ``image_root`` (default: the file's directory). The raw record
    is there for readers that need fields beyond the conversation (``vlsi eval``'s options).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    for default_id, record in iter_records(path):
        sample_id = default_id
        try:
            if isinstance(record, Rejected):
                raise record
            if isinstance(record, dict) and record.get("id") not in (None, ""):
                sample_id = str(record["id"])
            yield sample_id, record, parse_record(record, sample_id, root)
        except Rejected as err:
            yield sample_id, record, err


def iter_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(default id, record) pairs; a malformed JSONL line yields a :class:`Rejected`."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        for index, record in enumerate(records):
            yield f"{path}:{index}", record
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{path}:{lineno}", Rejected(f"malformed JSON line {lineno}: {err.msg}", MALFORMED_JSON)


def parse_record(record: Any, sample_id: str, image_root: Path) -> Sample:
    """Normalise one LLaVA-style or messages-style record (raises :class:`Rejected`)."""
    if not isinstance(record, dict):
        raise Rejected("record is not a JSON object", BAD_RECORD)
    if isinstance(record.get("conversations"), list):
        turns = [_llava_turn(t, i) for i, t in enumerate(record["conversations"])]
    elif isinstance(record.get("messages"), list):
        turns = [_message_turn(t, i) for i, t in enumerate(record["messages"])]
    else:
        raise Rejected("no 'conversations' or 'messages' list", BAD_RECORD)
    if not any(t["role"] == "assistant" for t in turns):
        raise Rejected("no assistant turn", NO_ASSISTANT)

    images = _image_list(record)
    placeholders = sum(item["type"] == "image" for t in turns for item in t["content"])
    if placeholders == 0 and images:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise Rejected(f"{_count(len(images), 'image')} but no user turn to put them in", IMAGE_COUNT)
        first_user["content"][:0] = [{"type": "image"} for _ in images]
    elif placeholders != len(images):
        raise Rejected(f"{_count(placeholders, '<image> tag')} but {_count(len(images), 'image')}", IMAGE_COUNT)

    resolved = []
    for image in images:
        p = Path(image).expanduser()
        p = p if p.is_absolute() else image_root / p
        if not p.is_file():
            raise Rejected(f"image not found: {p}", IMAGE_NOT_FOUND)
        resolved.append(p)
    return Sample(sample_id, turns, resolved)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _image_list(record: dict) -> list[str]:
    value = record.get("images", record.get("image"))
    if value is None or value == "":
        return []
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise Rejected("'image'/'images' must be a path or a list of paths", BAD_RECORD)
    return value


def _role(value: Any, index: int) -> str:
    role = _ROLES.get(str(value).lower()) if isinstance(value, str) else None
    if role is None:
        raise Rejected(f"turn {index}: unknown role {value!r}", BAD_RECORD)
    return role


def _llava_turn(turn: Any, index: int) -> dict[str, Any]:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise Rejected(f"turn {index}: expected {{'from': ..., 'value': str}}", BAD_RECORD)
    return {"role": _role(turn.get("from"), index), "content": split_image_tags(turn["value"])}


def _message_turn(turn: Any, index: int) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise Rejected(f"turn {index}: expected {{'role': ..., 'content': ...}}", BAD_RECORD)
    role = _role(turn.get("role"), index)
    content = turn.get("content")
    if isinstance(content, str):
        return {"role": role, "content": split_image_tags(content)}
    if not isinstance(content, list):
        raise Rejected(f"turn {index}: content must be a string or a list of items", BAD_RECORD)
    items: list[dict[str, Any]] = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            items.append({"type": "image"})
        elif kind == "text" and isinstance(item.get("text"), str):
            items.extend(split_image_tags(item["text"]))
        else:
            raise Rejected(f"turn {index}: unsupported content item {_short(item)}", BAD_RECORD)
    return {"role": role, "content": items}


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_image_tags(text: str) -> list[dict[str, Any]]:
    """``"<image>\\nWhat is it?"`` -> ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``.

    Whitespace around a tag is dropped; text without tags is kept exactly (a turn with empty
    text keeps one empty text item so the template still renders the turn).
    """
    if IMAGE_TAG not in text:
        return [{"type": "text", "text": text}]
    items: list[dict[str, Any]] = []
    for i, piece in enumerate(_TAG_SPLIT.split(text)):
        if i:
            items.append({"type": "image"})
        if piece:
            items.append({"type": "text", "text": piece})
    return items
