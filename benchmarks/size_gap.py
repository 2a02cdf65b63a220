"""Does the synthetic task reward capacity? Train two tiny sizes the same way and compare.

The synthetic visual-instruction data (``vlsi.data.synthetic``) is the ground of the demo and of
the tests: a larger tiny model must clearly beat a smaller one when both are trained the same
way, or there is nothing for a teacher to teach. This script trains the tiny teacher shape and
the tiny student shape of ``vlsi.tiny`` from scratch with the same next-token SFT recipe (the
transformers ``Trainer``, identical data, steps, batch and learning rate) and reports held-out
answer accuracy (teacher-forced: every supervised token of the reply predicted exactly),
overall and per category.

Run (about 10 minutes on 2 CPU cores with the defaults)::

    python benchmarks/size_gap.py --out runs/size_gap --steps 600

Writes ``OUT/size_gap.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from vlsi.backbones import ImageEncoder, load_backbone, load_tokenizer
from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.data.synthetic import SyntheticConfig, generate_dataset
from vlsi.tiny import STUDENT, TEACHER, save_tiny_pair


def answer_accuracy(backbone, dataset, collate, categories, batch_size=32):
    """Teacher-forced exact match of each reply, overall and per category."""
    model = backbone.model.eval()
    hits, totals = defaultdict(int), defaultdict(int)
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate(items)
            logits = model(**backbone.model_inputs(batch)).logits
            pred, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
            supervised = gold != -100
            correct = ((pred == gold) | ~supervised).all(dim=1)
            for item, ok in zip(items, correct.tolist()):
                cat = categories[item["id"]]
                hits[cat] += ok
                totals[cat] += 1
    per_cat = {c: hits[c] / totals[c] for c in sorted(totals)}
    return sum(hits.values()) / sum(totals.values()), per_cat


def train_and_eval(ckpt, train, evalset, categories, collate, args, out):
    backbone = load_backbone(ckpt)
    backbone.model.train()
    targs = TrainingArguments(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.steps // 20,
        weight_decay=0.0, logging_steps=max(1, args.steps // 10), save_strategy="no",
        report_to=[], use_cpu=True, seed=args.seed, data_seed=args.seed,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    start = time.perf_counter()
    trainer = Trainer(model=backbone.model, args=targs, train_dataset=train, data_collator=collate)
    result = trainer.train()
    seconds = time.perf_counter() - start
    acc, per_cat = answer_accuracy(backbone, evalset, collate, categories)
    params = sum(p.numel() for p in backbone.model.parameters())
    return {"params": params, "train_loss": result.training_loss, "train_seconds": seconds,
            "eval_accuracy": acc, "eval_accuracy_by_category": per_cat}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/size_gap")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-eval", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    out = Path(args.out)
    data_dir = out / "data"
    generate_dataset(data_dir, SyntheticConfig(seed=args.seed, num_train=args.num_train,
                                               num_eval=args.num_eval, image_size=args.image_size),
                     overwrite=True)
    pair = save_tiny_pair(out / "tiny", "qwen2_vl", seed=args.seed)
    tok = load_tokenizer(pair.student)
    images = ImageEncoder.from_pretrained(pair.student)
    train = VisualInstructionDataset.from_files([data_dir / "train.json"], tok, images, max_length=512)
    evalset = VisualInstructionDataset.from_files([data_dir / "eval.json"], tok, images, max_length=512)
    categories = {r["id"]: r["category"] for r in json.loads((data_dir / "eval.json").read_text())}
    collate = VisionLanguageCollator.for_tokenizer("qwen2_vl", tok)
    report = {"config": vars(args), "sizes": {"larger": vars(TEACHER), "smaller": vars(STUDENT)}}
    for name, ckpt in (("larger", pair.teacher), ("smaller", pair.student)):
        torch.manual_seed(args.seed)
        report[name] = train_and_eval(ckpt, train, evalset, categories, collate, args, out / name)
    (out / "size_gap.json").write_text(json.dumps(report, indent=2) + "\n")
    cats = sorted(report["larger"]["eval_accuracy_by_category"])
    print(f"{'model':8} {'params':>9} {'loss':>7} {'acc':>6} " + " ".join(f"{c[:8]:>8}" for c in cats))
    for name in ("larger", "smaller"):
        r = report[name]
        print(f"{name:8} {r['params']:>9,} {r['train_loss']:7.3f} {r['eval_accuracy']:6.3f} "
              + " ".join(f"{r['eval_accuracy_by_category'][c]:8.2f}" for c in cats))
    print(f"wrote {out / 'size_gap.json'}")


if __name__ == "__main__":
    main()
