"""The demo with a smaller student (docs/demo.md, "A smaller student"): same task, the shipped
recipe's teacher (copied from a built pair, so it is not retrained), a student of LAYERS x WIDTH
with the teacher's frozen vision encoder, then the three-seed demo on that pair.

    python benchmarks/smaller_student.py --pair runs/pair --layers 2 --width 16 --steps 8000 \
        --out runs/smaller

``--pair`` is a pair built by ``vlsi demo pretrain`` (its ``data/`` and ``teacher/`` are copied).
The student needs at least 2 layers (VLsI verbalizes every layer below the last).
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path

from vlsi.demo import run_demo
from vlsi.demo.pair import build_pair
from vlsi.demo.recipe import DemoRecipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", required=True, help="a built pair whose teacher and data are reused")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True, help="student pretraining steps")
    ap.add_argument("--out", default="runs/smaller")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    base = DemoRecipe()
    recipe = replace(base, student=replace(base.student, num_layers=a.layers, hidden_size=a.width,
                                           intermediate_size=2 * a.width),
                     student_pretrain=replace(base.student_pretrain, steps=a.steps), pretrain_threads=1)
    name = f"{a.layers}x{a.width}"
    pair_dir = Path(a.out) / f"pair-{name}"
    if not pair_dir.exists():
        pair_dir.mkdir(parents=True)
        for part in ("data", "teacher"):
            shutil.copytree(Path(a.pair) / part, pair_dir / part)
    build_pair(pair_dir, recipe)
    run_demo(Path(a.out) / f"demo-{name}", seeds=a.seeds, recipe=recipe, pair_dir=pair_dir,
             command=f"python benchmarks/smaller_student.py --layers {a.layers} --width {a.width} "
                     f"--steps {a.steps}")


if __name__ == "__main__":  # the demo's seeds run in spawned worker processes
    main()
