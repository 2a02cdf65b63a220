"""Learning curves of one tiny Qwen2-VL size on one synthetic task setting (demo calibration).

A plain AdamW loop (linear warm-up over 30 steps, cosine to 5% of the learning rate, gradient
clipping at 1.0) trains every parameter of a random-initialised tiny model on
``vlsi.data.synthetic`` data and prints held-out accuracy (teacher-forced: every supervised
token of the reply is the argmax) overall and per category every ``--eval-every`` steps. It is
how the demo's task, sizes and budgets were chosen; ``docs/demo.md`` quotes these runs::

    # vision initialisation (4x64 LM, 2x32 vision, one object, colour question, 200 steps)
    python benchmarks/calibrate_task.py --categories color_of --max-objects 1 --steps 200 --vision-init hf
    python benchmarks/calibrate_task.py --categories color_of --max-objects 1 --steps 200 --vision-init fanin
    python benchmarks/calibrate_task.py --categories color_of --max-objects 1 --steps 200
    # the demo's task, two sizes trained the same way
    T="--categories color_of,shape_of,count_color,count_shape --object-scale 1 --shapes 4 --colors 4"
    python benchmarks/calibrate_task.py $T --size 8,96,192,2,48 --steps 1000 --eval-every 250
    python benchmarks/calibrate_task.py $T --size 2,16,32,2,48 --steps 1000 --eval-every 250
    python benchmarks/calibrate_task.py $T --size 2,32,64,1,32 --steps 1500 --eval-every 300
    python benchmarks/calibrate_task.py $T --size 4,64,128,2,48 --steps 800 --eval-every 200
    # six shapes, jittered or filling their cell
    python benchmarks/calibrate_task.py --categories color_of,shape_of,count_color,count_shape \\
        --size 4,64,128,2,48 --steps 1000 --eval-every 250
    python benchmarks/calibrate_task.py --categories color_of,shape_of,count_color,count_shape \\
        --size 4,64,128,2,48 --steps 800 --eval-every 200 --object-scale 1

``--size`` is ``layers,width,ffn,vision_depth,vision_width``. Run one at a time on 2 cores: two
concurrent torch jobs slow each other down many times over.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.data.synthetic import DEFAULT_COLORS, DEFAULT_SHAPES, SyntheticConfig, generate_dataset
from vlsi.models.backbones import ImageEncoder, load_backbone, load_tokenizer
from vlsi.models.tiny import TinySize, build_tiny_tokenizer, save_tiny_checkpoint


def redraw_vision(backbone, how: str) -> None:
    """``tiny``: keep vlsi.models.tiny's N(0, 0.1); ``hf``: N(0, 0.02) as transformers draws it;
    ``fanin``: N(0, 1/fan_in). Matrices and kernels only (norms and biases as initialised)."""
    if how == "tiny":
        return
    with torch.no_grad():
        for p in backbone.vision_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02 if how == "hf" else p[0].numel() ** -0.5)


@torch.no_grad()
def accuracy(backbone, evalset, collate, categories):
    model = backbone.model.eval()
    hits, totals = defaultdict(int), defaultdict(int)
    for start in range(0, len(evalset), 64):
        items = [evalset[i] for i in range(start, min(start + 64, len(evalset)))]
        batch = collate(items)
        logits = model(**backbone.model_inputs(batch)).logits
        pred, gold = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        for item, ok in zip(items, ((pred == gold) | (gold == -100)).all(1).tolist()):
            hits[categories[item["id"]]] += ok
            totals[categories[item["id"]]] += 1
    model.train()
    return sum(hits.values()) / sum(totals.values()), {c: hits[c] / totals[c] for c in sorted(totals)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/calibrate")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--categories", default="color_at")
    parser.add_argument("--size", default="4,64,128,2,32")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--mc-fraction", type=float, default=0.0)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--object-scale", type=float, default=0.0, help="0: the generator's default range")
    parser.add_argument("--shapes", type=int, default=6)
    parser.add_argument("--colors", type=int, default=6)
    parser.add_argument("--vision-init", choices=["tiny", "hf", "fanin"], default="tiny")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    out = Path(args.out)
    task = SyntheticConfig(
        seed=0, num_train=args.num_train, num_eval=300, image_size=args.image_size,
        categories=tuple(args.categories.split(",")), mc_fraction=args.mc_fraction,
        max_objects=args.max_objects, shapes=DEFAULT_SHAPES[:args.shapes], colors=DEFAULT_COLORS[:args.colors],
        **({"object_scale": (args.object_scale, args.object_scale)} if args.object_scale else {}))
    data = out / ("data-" + "-".join(str(v) for v in (args.image_size, args.categories, args.mc_fraction,
                                                        args.max_objects, args.num_train, args.object_scale,
                                                        args.shapes, args.colors)))
    if not (data / "train.json").exists():
        generate_dataset(data, task, overwrite=True)
    layers, width, ffn, vdepth, vwidth = map(int, args.size.split(","))
    size = TinySize(num_layers=layers, hidden_size=width, intermediate_size=ffn,
                    num_heads=4 if width % 32 == 0 else 2, num_kv_heads=2,
                    vision_depth=vdepth, vision_width=vwidth)
    ckpt = save_tiny_checkpoint(out / f"model-{args.size}", "qwen2_vl", size, build_tiny_tokenizer(), seed=0)
    backbone, tok = load_backbone(ckpt), load_tokenizer(ckpt)
    images = ImageEncoder.from_pretrained(ckpt)
    train = VisualInstructionDataset.from_files([data / "train.json"], tok, images, max_length=512)
    evalset = VisualInstructionDataset.from_files([data / "eval.json"], tok, images, max_length=512)
    categories = {r["id"]: r["category"] for r in json.loads((data / "eval.json").read_text())}
    collate = VisionLanguageCollator.for_tokenizer("qwen2_vl", tok)
    redraw_vision(backbone, args.vision_init)
    model = backbone.model.train()
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 30) * max(
        0.05, 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    gen, start, step, losses = torch.Generator().manual_seed(0), time.time(), 0, []
    while step < args.steps:
        order = torch.randperm(len(train), generator=gen).tolist()
        for s in range(0, len(order) - args.batch_size + 1, args.batch_size):
            batch = collate([train[i] for i in order[s:s + args.batch_size]])
            loss = model(**backbone.model_inputs(batch), labels=batch["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad()
            losses.append(loss.item())
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                acc, per_cat = accuracy(backbone, evalset, collate, categories)
                recent = losses[-20:]
                print(f"step {step} t={time.time() - start:.0f}s loss={sum(recent) / len(recent):.3f} "
                      f"acc={acc:.3f} " + " ".join(f"{c}={v:.2f}" for c, v in per_cat.items()), flush=True)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
