"""The regime search behind the demo's recipe (docs/demo.md, "How the regime was found").

Pretrains a tiny teacher and student (optionally the student with the teacher's frozen vision
encoder, optionally on a subset), then runs SFT-only, last-layer KD + SFT and VLsI from the
student with the same steps, and prints held-out accuracy per category, **teacher-forced**
(one forward pass; the demo itself scores greedy generation). Commands of the runs quoted in
docs/demo.md:

    python benchmarks/regime_search.py --out runs/regime/r1 --share-vision
    python benchmarks/regime_search.py --out runs/regime/r2 --share-vision --student-train 1000 \
        --distill-train 1000 --s-steps 1500            # reuses r1's data and teacher (symlinked)
    python benchmarks/regime_search.py --out runs/regime/r3 --num-train 16000 --t-steps 4000 \
        --s-steps 3000 --share-vision --seeds 0 1 --threads 1
"""
import argparse, json, os, time
from dataclasses import replace
from pathlib import Path
import torch, yaml
from torch.utils.data import Subset
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
from vlsi.data import VisionLanguageCollator, VisualInstructionDataset
from vlsi.data.synthetic import SyntheticConfig, generate_dataset, DEFAULT_SHAPES, DEFAULT_COLORS
from vlsi.demo.pipeline import export_merged, run_config
from vlsi.demo.pretrain import pretrain, teacher_forced_accuracy
from vlsi.demo.recipe import DemoRecipe, StageBudget
from vlsi.demo.recipe import training_config
from vlsi.models.backbones import load_backbone, load_tokenizer, ImageEncoder
from vlsi.models.tiny import TinySize, save_tiny_pair
from vlsi.train.config import TrainingConfig, load_config
from vlsi.train.stages.distill import layout, run_distill
from vlsi.train.stages.sft import run_sft
from vlsi.train.stages.verbalize import run_verbalize

def sizes(spec):
    L, d = (int(x) for x in spec.split("x"))
    heads = max(2, d // 24) if d >= 48 else 2
    while d % heads or (d // heads) % 8: heads -= 1
    return TinySize(num_layers=L, hidden_size=d, intermediate_size=2 * d, num_heads=heads,
                    num_kv_heads=1 if heads % 2 else 2 if heads >= 2 else 1,
                    vision_depth=2, vision_width=48, extra_vocab=8)

def per_category(bb, ds, collate, records):
    cats = sorted({r["category"] for r in records})
    out = {}
    for c in cats:
        idx = [i for i, r in enumerate(records) if r["category"] == c]
        out[c] = round(teacher_forced_accuracy(bb, Subset(ds, idx), collate), 4)
    out["all"] = round(teacher_forced_accuracy(bb, ds, collate), 4)
    return out

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--categories", nargs="+", default=["count_color", "count_shape", "count_and", "count_or", "count_more", "count_add"])
    ap.add_argument("--num-train", type=int, default=4000)
    ap.add_argument("--distill-train", type=int, default=0, help="subset size for distillation (0 = all)")
    ap.add_argument("--student-train", type=int, default=0, help="subset the student pretrains on (0 = all)")
    ap.add_argument("--num-eval", type=int, default=400)
    ap.add_argument("--teacher", default="8x96"); ap.add_argument("--student", default="3x16")
    ap.add_argument("--t-steps", type=int, default=3000); ap.add_argument("--s-steps", type=int, default=3000)
    ap.add_argument("--share-vision", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--pair-seed", type=int, default=0)
    ap.add_argument("--verb-steps", type=int, default=150)
    ap.add_argument("--int-steps", type=int, default=300); ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3); ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--int-lr", type=float, default=None)
    ap.add_argument("--rows", nargs="+", default=["sft_only", "llkd", "vlsi"])
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for vlsi rows k=v")
    ap.add_argument("--pretrain-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--snapshots", type=int, nargs="*", default=[])
    ap.add_argument("--teacher-dir", default=None, help="use this teacher model dir instead of the trained one")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    task = SyntheticConfig(seed=0, num_train=a.num_train, num_eval=a.num_eval, image_size=56, grid_size=2,
                           min_objects=1, max_objects=4, categories=tuple(a.categories), mc_fraction=0.0,
                           shapes=DEFAULT_SHAPES[:4], colors=DEFAULT_COLORS[:4], object_scale=(1.0, 1.0))
    data = out / "data"
    if not (data / "meta.json").is_file():
        generate_dataset(data, task, overwrite=True)
    records = json.loads((data / "eval.json").read_text())
    train_records = json.loads((data / "train.json").read_text())
    def subset_file(n, name):
        if not n: return data / "train.json"
        f = data / f"{name}-{n}.json"
        if not f.is_file(): f.write_text(json.dumps(train_records[:n]))
        return f
    s_train_file = subset_file(a.student_train, "train")
    d_train_file = subset_file(a.distill_train, "train")
    T, S = sizes(a.teacher), sizes(a.student)
    pair = save_tiny_pair(out / "init", "qwen2_vl", teacher=T, student=S, seed=a.pair_seed)
    tok = load_tokenizer(pair.student); im = ImageEncoder.from_pretrained(pair.student)
    mk = lambda f: VisualInstructionDataset.from_files([f], tok, im, max_length=256)
    train, s_train, evalset = mk(data / "train.json"), mk(s_train_file), mk(data / "eval.json")
    collate = VisionLanguageCollator.for_tokenizer("qwen2_vl", tok)
    curve = Subset(evalset, range(min(200, len(evalset))))
    tp = pretrain(pair.teacher, out / "teacher", train, curve, collate,
                  TrainingConfig(**training_config(StageBudget(a.t_steps, a.lr, a.min_lr), a.pair_seed)),
                  eval_every=max(100, a.t_steps // 10), name="teacher",
                  snapshot_steps=tuple(a.snapshots))
    print("teacher curve", [(p["step"], round(p["eval_accuracy"], 3)) for p in tp.curve], f"{tp.seconds:.0f}s", flush=True)
    sp = pretrain(pair.student, out / "student", s_train, curve, collate,
                  TrainingConfig(**training_config(StageBudget(a.s_steps, a.lr, a.min_lr), a.pair_seed)),
                  eval_every=max(100, a.s_steps // 10), name="student",
                  vision_from=tp.model_dir if a.share_vision else None)
    print("student curve", [(p["step"], round(p["eval_accuracy"], 3)) for p in sp.curve], f"{sp.seconds:.0f}s", flush=True)
    res_file = out / ("results-" + "-".join(map(str, a.seeds)) + (("-" + "-".join(a.set)) if a.set else "") + ".json")
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    def ev(key, d):
        if key in results: return results[key]
        bb = load_backbone(d); r = per_category(bb, evalset, collate, records); results[key] = r
        res_file.write_text(json.dumps(results, indent=1)); return r
    if a.teacher_dir:
        tp.model_dir = Path(a.teacher_dir)
    print("teacher", ev("teacher" + (":" + Path(a.teacher_dir).name if a.teacher_dir else ""), tp.model_dir)); print("student", ev("student", sp.model_dir), flush=True)
    if a.pretrain_only: return
    recipe = replace(DemoRecipe(), teacher=T, student=S, lora_r=a.lora_r, lora_alpha=2 * a.lora_r,
                     verbalize=StageBudget(a.verb_steps, a.lr, a.min_lr),
                     interact=StageBudget(a.int_steps, a.int_lr or a.lr, a.min_lr),
                     sft=StageBudget(a.sft_steps, a.lr, a.min_lr))
    extra = {}
    for kv in a.set:
        k, v = kv.split("=", 1); extra[k] = yaml.safe_load(v)
    tag = "-".join(kv.replace("interaction.", "").replace("=", "") for kv in a.set)
    for seed in a.seeds:
        root = out / f"seed-{seed}"
        root.mkdir(exist_ok=True)
        cfgd = run_config(recipe, root, data, tp.model_dir, sp.model_dir, seed)
        cfgd["data"]["train"] = [str(d_train_file)]
        cfgd["interact"]["learning_rate"] = recipe.interact.learning_rate
        cfg_file = root / "vlsi.yaml"; cfg_file.write_text(yaml.safe_dump(cfgd, sort_keys=False))
        for row in a.rows:
            key = f"{row}{'-' + tag if tag and row != 'sft_only' else ''}/s{seed}"
            if key in results: print(key, results[key]["all"]); continue
            t1 = time.perf_counter()
            if row == "sft_only":
                cfg = load_config(cfg_file, {"sft.max_steps": a.int_steps + a.sft_steps})
                d = run_sft(cfg, root / "sft-only", adapter=None, resume=True)
            else:
                ov = dict(extra)
                name = row + ("-" + tag if tag else "")
                ov["output_dir"] = str(root / name)
                if row == "llkd": ov["interaction.intermediate_op"] = "none"
                if row == "ilonly": ov["interaction.last_op"] = "none"
                # share verbalizers across rows of a seed
                cfg = load_config(cfg_file, ov)
                lay = layout(cfg); lay.root.mkdir(parents=True, exist_ok=True)
                base = layout(load_config(cfg_file))
                for sub in ("1-teacher-verbalize", "2-student-verbalize"):
                    if row != "vlsi" or tag:
                        src = base.root / sub
                        if not (lay.root / sub).exists():
                            if not (src / "step_complete.json").is_file():
                                run_distill_verbs(load_config(cfg_file))
                            os.symlink(src.resolve(), lay.root / sub)
                d = run_distill(cfg)
                if row == "vlsi" and not tag:
                    nd = export_merged(Path(cfg.student), lay.interact_adapter, lay.student_verbalize, root / "vlsi-no-sft")
                    r = ev(f"vlsi_no_sft/s{seed}", nd); print(f"vlsi_no_sft/s{seed}", r["all"])
            r = ev(key, d)
            print(key, r, f"{time.perf_counter() - t1:.0f}s", flush=True)
    print(json.dumps(summarise(results), indent=1))

def run_distill_verbs(cfg):
    lay = layout(cfg)
    for role in ("teacher", "student"):
        run_verbalize(cfg, role, lay.verbalize_dir(role), resume=True)

def summarise(results):
    import statistics as st
    rows = {}
    for k, v in results.items():
        if "/s" in k:
            row, s = k.rsplit("/s", 1); rows.setdefault(row, {})[int(s)] = v["all"]
    out = {}
    base = rows.get("sft_only", {})
    for row, d in rows.items():
        vals = list(d.values())
        diffs = [d[s] - base[s] for s in d if s in base]
        out[row] = {"mean": round(st.mean(vals), 4), "per_seed": d,
                    "minus_sft": [round(x, 4) for x in diffs]}
    return out

if __name__ == "__main__":
    main()
