"""Does the synthetic task reward capacity? Train the demo's two tiny sizes the same way.

The synthetic visual-instruction data (``vlsi.data.synthetic``) is the ground of the demo: a
larger tiny model must clearly beat a smaller one when both are trained the same way, or there
is nothing for a teacher to teach. This script trains the demo's teacher and student shapes
(``vlsi.demo.recipe.DemoRecipe``) from scratch on the demo's task with one recipe (identical
data, steps, batch, learning rate and schedule: ``vlsi.demo.pretrain``) and prints held-out
accuracy (teacher-forced: every supervised token of the reply predicted exactly) every
``--eval-every`` steps: the learning curves behind the demo's sizes and budgets.

Run (about 4 minutes on 2 CPU cores with the defaults)::

    python benchmarks/size_gap.py --out runs/size_gap --steps 1000

Writes ``OUT/size_gap.json`` and prints the curves side by side.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch.utils.data import Subset
from transformers.utils import logging as hf_logging

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.data.synthetic import generate_dataset
from vlsi.demo.pretrain import pretrain
from vlsi.demo.recipe import MAX_LENGTH, training_config
from vlsi.demo.recipe import DemoRecipe, StageBudget
from vlsi.models.backbones import ImageEncoder, load_tokenizer
from vlsi.models.tiny import save_tiny_pair
from vlsi.train.config import TrainingConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/size_gap")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    recipe = DemoRecipe()
    out = Path(args.out)
    data_dir = out / "data"
    if not (data_dir / "meta.json").is_file():
        generate_dataset(data_dir, recipe.task, overwrite=True)
    pair = save_tiny_pair(out / "init", "qwen2_vl", teacher=recipe.teacher, student=recipe.student,
                          seed=args.seed)
    tok = load_tokenizer(pair.student)
    images = ImageEncoder.from_pretrained(pair.student)
    train = VisualInstructionDataset.from_files([data_dir / "train.json"], tok, images, max_length=MAX_LENGTH)
    evalset = VisualInstructionDataset.from_files([data_dir / "eval.json"], tok, images, max_length=MAX_LENGTH)
    subset = Subset(evalset, range(min(args.eval_samples, len(evalset))))
    collate = VisionLanguageCollator.for_tokenizer("qwen2_vl", tok)
    budget = replace(StageBudget(args.steps, args.lr, 1e-4), batch_size=args.batch_size)
    report = {"config": vars(args), "task": asdict(recipe.task),
              "sizes": {"larger": asdict(recipe.teacher), "smaller": asdict(recipe.student)}}
    for name, ckpt in (("larger", pair.teacher), ("smaller", pair.student)):
        result = pretrain(ckpt, out / name, train, subset, collate,
                          TrainingConfig(**training_config(budget, args.seed)),
                          eval_every=args.eval_every, name=name)
        report[name] = {"params": result.params, "seconds": result.seconds, "curve": result.curve}
    (out / "size_gap.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'step':>6} {'larger':>8} {'smaller':>8}   (held-out accuracy, teacher-forced)")
    smaller = {p["step"]: p["eval_accuracy"] for p in report["smaller"]["curve"]}
    for p in report["larger"]["curve"]:
        other = smaller.get(p["step"])
        print(f"{p['step']:>6} {100 * p['eval_accuracy']:>7.1f}% "
              + (f"{100 * other:>7.1f}%" if other is not None else "       —"))
    print(f"params: larger {report['larger']['params']:,}, smaller {report['smaller']['params']:,}")
    print(f"wrote {out / 'size_gap.json'}")


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    main()
