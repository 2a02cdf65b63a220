"""The offline teacher cache against the online teacher: size, accuracy, step time, demo accuracy.

    python benchmarks/teacher_cache.py bytes --out docs/bench/teacher_cache_bytes.json
    python benchmarks/teacher_cache.py demo --out runs/cache_demo --seeds 3
    python benchmarks/teacher_cache.py real --run runs/real --out runs/cache_real

``bytes``: one shard of random top-K data per K (8, 32, 128) at the real vocabulary 151,936
with 20 + 1 layers, written by the cache's own writer: file bytes per response token.

``demo``: on the demo's pretrained pair and data (``vlsi demo``'s recipe), per seed: ``vlsi
distill`` online (the demo's VLsI row), a K = 32 cache of the same data, then the interaction
and SFT steps again reading the cache; both students evaluated on the held-out questions.
For seed 0 also: on 16 micro-batches, the KLD matrices and matching distributions of the
online teacher against caches with K = 8, 32, 128 (same student, same batches); and the
interaction step's time split from both runs' ``seconds/*`` metrics.

``real``: the pair and run of ``benchmarks/real_shapes.py`` (Qwen2-VL-7B and -2B shapes, fewer
layers): a K = 32 cache, then the interaction step online and from the cache, each as its own
process (peak RSS from ``wait4``) with its time split.
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from real_shapes import run_measured  # noqa: E402  (wall time and peak RSS of a child)


def measure_bytes(out: Path) -> dict:
    from vlsi.train.teacher_cache import ShardWriter, bytes_per_token, id_bits, top_k_of

    vocab, layers, tokens = 151936, 21, 64
    g = torch.Generator().manual_seed(0)
    rows = {}
    for k in (8, 32, 128):
        root = Path(tempfile.mkdtemp(prefix=f"cache-bytes-k{k}-"))
        writer = ShardWriter(root, 0, id_bits(vocab), "float16", samples_per_shard=1)
        logp = torch.log_softmax(torch.randn(tokens, layers, vocab, generator=g) * 3, dim=-1)
        ids, values, tail = top_k_of(logp, k)
        writer.add("sample", ids, values, tail)
        size = writer.shards[0]["bytes"]
        shutil.rmtree(root)
        rows[k] = {"file_bytes": size, "bytes_per_token": size / tokens,
                   "formula_bytes_per_token": bytes_per_token(k, layers, vocab)}
        print(f"K={k:>4}: {size / tokens:,.0f} bytes per response token on disk "
              f"(formula {bytes_per_token(k, layers, vocab):,.0f}; {layers} layers, V={vocab:,})")
    report = {"vocab_size": vocab, "layers": layers, "tokens": tokens, "storage": "float16", "rows": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _metrics(interact_dir: Path) -> dict:
    rows = [json.loads(line) for line in (interact_dir / "metrics.jsonl").read_text().splitlines()]
    keys = sorted({k for r in rows for k in r if k.startswith("seconds/")})
    return {k.split("/", 1)[1]: statistics.mean(r[k] for r in rows if k in r) for k in keys}


@torch.no_grad()
def approximation(cfg, run, caches: dict[int, Path], batches: int) -> dict:
    """KLD relative error and matching TV of each cache against the online teacher."""
    from vlsi.method.interaction import SparseTeacher, interaction_loss
    from vlsi.method.matching import match
    from vlsi.method.verbalizer import capture_layer_context, prediction_positions
    from vlsi.models.backbones import load_backbone
    from vlsi.train.distributed import load_verbalizers
    from vlsi.train.stages.training_data import load_training_data
    from vlsi.train.teacher_cache import TeacherCache, item_key

    teacher, student = load_backbone(cfg.teacher), load_backbone(cfg.student)
    t_verb = load_verbalizers(run.teacher_verbalize, teacher).eval()
    s_verb = load_verbalizers(run.student_verbalize, student).eval()
    dataset, collator, _ = load_training_data(cfg.data, cfg.student)
    opened = {k: TeacherCache.open(path) for k, path in caches.items()}
    i = cfg.interaction
    kw = dict(scale=i.scale, eps=i.eps, temperature_rule=i.temperature_rule)
    errors = {k: {"kld_rel_err": [], "tv": []} for k in caches}
    size = cfg.stage("interact").per_device_train_batch_size
    for b in range(batches):
        items = [dataset[n] for n in range(b * size, (b + 1) * size)]
        batch = collator(items)
        positions = prediction_positions(batch["labels"])
        fw = dict(output_hidden_states=True, use_cache=False, logits_to_keep=1)
        with capture_layer_context(teacher) as t_ctx:
            t_out = teacher.model(**teacher.model_inputs(batch), **fw)
        with capture_layer_context(student) as s_ctx:
            s_out = student.model(**student.model_inputs(batch), **fw)
        t_stack, t_fn = t_verb.response_inputs(t_out.hidden_states, positions, t_ctx)
        s_stack, s_fn = s_verb.response_inputs(s_out.hidden_states, positions, s_ctx)
        common = dict(vocab_size=min(teacher.lm_head.weight.shape[0], student.lm_head.weight.shape[0]),
                      strategy=i.strategy, chunk_size=i.chunk_size)
        online = interaction_loss(s_stack, t_stack, s_fn, t_fn, **common).kld
        p_online = match(online, i.strategy, **kw).probs
        for k, cache in opened.items():
            sparse = SparseTeacher(*cache.lookup([item_key(it) for it in items], positions.sum(1).tolist()))
            cached = interaction_loss(s_stack, sparse, s_fn, None, **common).kld
            scored = torch.isfinite(online)
            errors[k]["kld_rel_err"].append(float(((cached - online).abs()[scored] / online[scored]).mean()))
            p_cached = match(cached, i.strategy, **kw).probs
            errors[k]["tv"].append(float(0.5 * (p_cached - p_online).abs().sum(dim=1).max()))
    return {k: {"kld_rel_err_mean": statistics.mean(v["kld_rel_err"]), "tv_max_row_mean": statistics.mean(v["tv"]),
                "tv_max_row_max": max(v["tv"]), "batches": batches} for k, v in errors.items()}


def run_demo(out: Path, seeds: int, batches: int) -> dict:
    import yaml

    from vlsi.demo.run import prepare_run
    from vlsi.demo.pipeline import evaluate_model, run_config
    from vlsi.train.config import load_config
    from vlsi.train.stages.cache_teacher import run_cache_teacher
    from vlsi.train.stages.distill import layout, run_distill
    from vlsi.train.stages.interact import run_interact
    from vlsi.train.stages.sft import run_sft

    torch.set_num_threads(2)
    recipe, pair, data_dir, items = prepare_run(out, None, quick=False, seeds=seeds, pair_dir=None)
    report: dict = {"recipe_interact_steps": recipe.interact.steps, "seeds": {}}
    for seed in range(seeds):
        root = out / f"seed-{seed}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "vlsi.yaml").write_text(yaml.safe_dump(run_config(recipe, root, data_dir, pair.teacher, pair.student,
                                                                  seed), sort_keys=False))
        cfg = load_config(root / "vlsi.yaml")
        run = layout(cfg)
        run_distill(cfg)
        start = time.perf_counter()
        cache = run_cache_teacher(cfg, root / "cache-k32", teacher_verbalizers=run.teacher_verbalize, top_k=32)
        cache_seconds = time.perf_counter() - start
        cached_cfg = load_config(root / "vlsi.yaml", {"interaction.teacher_cache": str(cache)})
        run_interact(cached_cfg, root / "cached" / "3-interact", teacher_verbalizers=run.teacher_verbalize,
                     student_verbalizers=run.student_verbalize, resume=True)
        model = run_sft(cached_cfg, root / "cached" / "4-sft", adapter=root / "cached" / "3-interact" / "adapter",
                        student_verbalizers=run.student_verbalize, resume=True)
        online_acc = evaluate_model("vlsi", run.model, items, root / "eval", recipe)
        cached_acc = evaluate_model("vlsi_cached", model, items, root / "eval", recipe)
        row = {"online": online_acc, "cached": cached_acc, "cache_seconds": cache_seconds,
               "split_online": _metrics(run.interact), "split_cached": _metrics(root / "cached" / "3-interact")}
        if seed == 0:
            caches = {32: cache}
            for k in (8, 128):
                caches[k] = run_cache_teacher(cfg, root / f"cache-k{k}", teacher_verbalizers=run.teacher_verbalize,
                                              top_k=k)
            row["approximation"] = approximation(cfg, run, caches, batches)
        report["seeds"][seed] = row
        print(json.dumps({"seed": seed, **row}, indent=1, default=str), flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    return report


def run_real(run_dir: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config, run = run_dir / "config.yaml", run_dir / "run"
    cli = [sys.executable, "-m", "vlsi.cli"]
    common = ["--teacher-verbalizers", str(run / "1-teacher-verbalize"),
              "--student-verbalizers", str(run / "2-student-verbalize"), "--set", "training.max_steps=2"]
    report = {"cache": run_measured([*cli, "cache-teacher", str(config), "--out", str(out / "cache"), "--top-k", "32",
                                  "--teacher-verbalizers", str(run / "1-teacher-verbalize")], out / "cache.log")}
    for name, extra in (("online", []), ("cached", ["--teacher-cache", str(out / "cache")])):
        target = out / f"interact-{name}"
        report[name] = run_measured([*cli, "interact", str(config), *common, "--out", str(target), *extra],
                                 out / f"{name}.log")
        report[name]["split"] = _metrics(target)
    print(json.dumps(report, indent=1), flush=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bytes")
    b.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("demo")
    d.add_argument("--out", type=Path, default=Path("runs/cache_demo"))
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--batches", type=int, default=16)
    r = sub.add_parser("real")
    r.add_argument("--run", type=Path, default=Path("runs/real"))
    r.add_argument("--out", type=Path, default=Path("runs/cache_real"))
    args = parser.parse_args()
    if args.what == "bytes":
        measure_bytes(args.out)
    elif args.what == "demo":
        run_demo(args.out, args.seeds, args.batches)
    else:
        run_real(args.run, args.out)


if __name__ == "__main__":
    main()
