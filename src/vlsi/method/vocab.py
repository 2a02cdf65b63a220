"""The shared vocabulary of a teacher/student pair and the tokenizer agreement check.

VLsI compares teacher and student distributions token by token, so both must give every id
the same meaning. LM heads are often padded past the tokenizer (Qwen2-VL-2B has 151,936 rows,
7B and 72B have 152,064), so distributions are taken over the first
``V = min(V_teacher, V_student)`` logits, and the tokenizers must agree on every id below V.
"""

from __future__ import annotations

from typing import Any

from vlsi.errors import VlsiError


def shared_vocab_size(teacher_vocab: int, student_vocab: int) -> int:
    """``min(V_teacher, V_student)``: the logits both distributions are taken over."""
    if teacher_vocab <= 0 or student_vocab <= 0:
        raise VlsiError(f"vocabulary sizes must be positive, got {teacher_vocab} and {student_vocab}")
    return min(teacher_vocab, student_vocab)


def _tokens(tokenizer: Any, vocab: int) -> list[str | None]:
    """Token string of every id below ``vocab``; ``None`` for ids past the tokenizer's length."""
    n = min(len(tokenizer), vocab)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    return list(tokens) + [None] * (vocab - n)


def check_tokenizers(teacher_tok: Any, student_tok: Any, vocab: int, *, show: int = 5) -> None:
    """Raise a one-line :class:`VlsiError` naming the first ids where the tokenizers differ.

    Compares the token string of every id below ``vocab`` (an id that only one tokenizer
    defines is a difference too).
    """
    t = _tokens(teacher_tok, vocab)
    s = _tokens(student_tok, vocab)
    diffs = [i for i in range(vocab) if t[i] != s[i]]
    if diffs:
        shown = ", ".join(f"id {i}: teacher {t[i]!r} vs student {s[i]!r}" for i in diffs[:show])
        raise VlsiError(
            f"teacher and student tokenizers differ on {len(diffs)} of the {vocab} shared ids "
            f"(first: {shown}); VLsI needs one tokenizer for both"
        )
