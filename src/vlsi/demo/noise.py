"""Label noise for the demo's distillation data: answers wrong the way a weaker annotator is.

A stated share of the distillation records gets a wrong answer: a free-form list misses one
of its items (a missed object), a count is off by one. Evaluation stays on the clean held-out
split, so SFT on the noisy labels learns the noise while the teacher, pretrained on clean data,
can correct it (docs/demo.md, "Label noise").
"""

from __future__ import annotations

import copy
import random
from typing import Any

from vlsi.data.synthetic import LIST_SEPARATOR
from vlsi.errors import VlsiError


def wrong_answer(record: dict[str, Any], rng: random.Random) -> str | None:
    """A weaker annotator's answer to ``record``, or ``None`` when it has no such error."""
    answer = record["answer"]
    if record.get("unordered"):
        items = answer.split(LIST_SEPARATOR)
        if len(items) < 2:
            return None
        del items[rng.randrange(len(items))]
        return LIST_SEPARATOR.join(items)
    if answer.isdigit():
        count = int(answer)
        return str(count + 1 if count == 0 or rng.random() < 0.5 else count - 1)
    return None


def with_label_noise(records: list[dict[str, Any]], share: float, seed: int = 0
                     ) -> tuple[list[dict[str, Any]], list[str]]:
    """A copy of ``records`` in which ``share`` of them (drawn among those that can be wrong)
    have a wrong answer; returns it and the ids changed. Raises when too few can be wrong."""
    if not 0 <= share <= 1:
        raise VlsiError(f"label noise must be a share in [0, 1], got {share}")
    target = round(share * len(records))
    eligible = [k for k, r in enumerate(records) if wrong_answer(r, random.Random(0)) is not None]
    if target > len(eligible):
        raise VlsiError(f"label noise {share} needs {target} wrong answers, but only "
                        f"{len(eligible)} of {len(records)} records can be answered wrongly")
    draw = random.Random(f"label-noise/{seed}")
    chosen = sorted(draw.sample(eligible, target))
    noisy = copy.deepcopy(records)
    for k in chosen:
        record = noisy[k]
        wrong = wrong_answer(record, random.Random(f"label-noise/{seed}/{record['id']}"))
        record["answer"] = wrong
        record["conversations"][-1]["value"] = wrong
        record["label_noise"] = True
    return noisy, [noisy[k]["id"] for k in chosen]
