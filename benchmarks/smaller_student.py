"""The demo with a smaller student (docs/demo.md, "A smaller student"): same task, the shipped
pair's teacher (reused, not retrained: ``vlsi.demo.pair.reuse_teacher``), a student of LAYERS x
WIDTH with the teacher's frozen vision encoder, then the three-seed demo on that pair.

    python benchmarks/smaller_student.py --layers 2 --width 16 --steps 8000 --out runs/smaller

``--teacher-from`` is a pair built by ``vlsi demo pretrain`` (default: the shipped one).
The student needs at least 2 layers (VLsI verbalizes every layer below the last).
``--pretrain-only`` stops after the student's pretraining (its curve is in ``pair.json``).
``--samples N``: the data-limited regime, the student pretrained and distilled on N samples.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from vlsi.demo.run import run_demo
from vlsi.demo.pair import build_pair, load_teacher_source
from vlsi.demo.recipe import DemoRecipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher-from", default="shipped", help="a built pair whose teacher is reused")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--heads", type=int, default=2, help="attention heads (head_dim a multiple of 8)")
    ap.add_argument("--steps", type=int, required=True, help="student pretraining steps")
    ap.add_argument("--lr", type=float, default=None, help="student pretraining peak learning rate")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the student")
    ap.add_argument("--out", default="runs/smaller")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pretrain-only", action="store_true")
    ap.add_argument("--samples", type=int, default=None,
                    help="the student pretrains, and the distillation runs, on the first N "
                         "training samples only (the teacher saw all of them)")
    a = ap.parse_args()
    base = DemoRecipe()
    budget = replace(base.student_pretrain, steps=a.steps,
                     learning_rate=a.lr if a.lr is not None else base.student_pretrain.learning_rate)
    recipe = replace(base, student=replace(base.student, num_layers=a.layers, hidden_size=a.width,
                                           intermediate_size=2 * a.width, num_heads=a.heads,
                                           num_kv_heads=1),
                     student_pretrain=budget, student_pretrain_threads=a.threads,
                     student_samples=a.samples, distill_samples=a.samples)
    name = f"{a.layers}x{a.width}-{a.steps}" + (f"-n{a.samples}" if a.samples else "")
    pair_dir = Path(a.out) / f"pair-{name}"
    pair = build_pair(pair_dir, recipe, teacher_from=load_teacher_source(a.teacher_from))
    curve = pair.meta["curves"]["student"]
    print("student curve:", ", ".join(f"{p['step']}: {100 * p['eval_accuracy']:.2f}" for p in curve))
    if a.pretrain_only:
        return
    run_demo(Path(a.out) / f"demo-{name}", seeds=a.seeds, recipe=recipe, pair_dir=pair_dir,
             command=f"python benchmarks/smaller_student.py --layers {a.layers} --width {a.width} "
                     f"--heads {a.heads} --steps {a.steps}"
                     + (f" --samples {a.samples}" if a.samples else ""))


if __name__ == "__main__":  # the demo's seeds run in spawned worker processes
    main()
