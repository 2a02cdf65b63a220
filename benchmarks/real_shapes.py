"""One step of every stage at the real Qwen2-VL-7B (teacher) and -2B (student) shapes on this CPU.

    python benchmarks/real_shapes.py --out runs/real --teacher-layers 4 --student-layers 3

Builds the pair with random bf16 weights (:mod:`vlsi.models.real_shapes`: real widths, vocabularies and
vision tower, fewer decoder layers), then runs, each as its own process so that its peak RSS
is its own: teacher and student verbalization, the interaction step and SFT with export (one
optimizer step each, LoRA r = 64 as in the paper), and a stock ``transformers`` reload of the
exported student with one forward. Checks: the shared vocabulary is 151,936; LoRA sits on
exactly the language model's q/k/v/o/gate/up/down projections of every decoder layer and
nowhere else; each verb-FFN holds 3 d^2 parameters. Prints and writes (``OUT/report.json``)
each step's wall time and peak RSS, the interaction step's time split from its ``seconds/*``
metrics, and the longest sample and response in tokens (for benchmarks/plan_check.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_measured(command: list[str], log: Path) -> dict:
    """Run ``command`` as a child; its wall time and peak RSS (``ru_maxrss`` from ``wait4``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(command[:4])} failed (exit {code}); end of {log}:\n{tail}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}


def write_config(out: Path, teacher: Path, student: Path, synth: Path, teacher_layers: int,
                 student_layers: int) -> Path:
    """Every layer below the last is a target layer (at the real depths the default rule would
    pick every 4th)."""
    config = out / "config.yaml"
    config.write_text(f"""teacher: {teacher}
student: {student}
output_dir: {out / 'run'}
data:
  train: [{synth / 'train.json'}]
  image_root: {synth}
  max_length: 512
verbalizer:
  architecture: verb-ffn
  teacher_layers: {list(range(teacher_layers - 1))}
  student_layers: {list(range(student_layers - 1))}
interaction:
  strategy: vlsi
lora:
  r: 64
  alpha: 64
  dropout: 0.0
training:
  learning_rate: 1.0e-4
  min_learning_rate: 1.0e-6
  max_steps: 1
  per_device_train_batch_size: 1
  gradient_accumulation_steps: 1
  gradient_checkpointing: false
  logging_steps: 1
  save_steps: 1
  save_total_limit: 1
  seed: 0
""")
    return config


def checks(run: Path, student: Path) -> dict:
    """The shared vocabulary, the LoRA targets and the verb-FFN sizes, read from the outputs."""
    from safetensors import safe_open

    interact = json.loads((run / "3-interact" / "step_complete.json").read_text())
    student_cfg = json.loads((student / "config.json").read_text())
    layers = student_cfg.get("text_config", student_cfg)["num_hidden_layers"]
    with safe_open(str(run / "3-interact" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    targets = {re.sub(r"\.lora_[AB]\.weight$", "", k) for k in keys}
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    expected = {f"base_model.model.model.language_model.layers.{i}.{p}" for i in range(layers) for p in projections}
    verb = {}
    for role, model in (("teacher", run.parent / "pair" / "teacher"), ("student", student)):
        step = run / ("1-teacher-verbalize" if role == "teacher" else "2-student-verbalize")
        cfg = json.loads((model / "config.json").read_text())
        d = cfg.get("text_config", cfg)["hidden_size"]
        sizes: dict[str, int] = {}
        with safe_open(str(step / "verbalizers.safetensors"), "pt") as f:
            for key in f.keys():
                layer = key.split(".")[1]
                sizes[layer] = sizes.get(layer, 0) + math.prod(f.get_slice(key).get_shape())
        verb[role] = {"width": d, "parameters_per_layer": sorted(set(sizes.values())),
                      "is_3_d_squared": set(sizes.values()) == {3 * d * d}, "layers": len(sizes)}
    return {
        "shared_vocab": interact["shared_vocab"],
        "lora_targets_exact": targets == expected,
        "lora_modules": len(targets),
        "verbalizers": verb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--student-layers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    py = sys.executable
    report: dict = {"teacher": "Qwen2-VL-7B shape", "student": "Qwen2-VL-2B shape",
                    "teacher_layers": a.teacher_layers, "student_layers": a.student_layers,
                    "threads": a.threads, "steps": {}}
    steps = report["steps"]
    build = ("from vlsi.models.real_shapes import save_real_shape_pair; "
             f"save_real_shape_pair({str(out / 'pair')!r}, teacher_layers={a.teacher_layers}, "
             f"student_layers={a.student_layers})")
    steps["build pair"] = run_measured([py, "-c", build], out / "build.log")
    teacher, student = out / "pair" / "teacher", out / "pair" / "student"
    steps["synthetic data"] = run_measured([py, "-m", "vlsi.cli", "data", "synth", str(out / "synth"),
                                            "--num-train", "8", "--num-eval", "2"], out / "synth.log")
    config = write_config(out, teacher, student, out / "synth", a.teacher_layers, a.student_layers)
    from vlsi.data.check import check_data

    stats = check_data(out / "synth" / "train.json", student, out / "synth", max_length=512)
    report["data_tokens"] = {"max_tokens_per_sample": stats["length"]["max"],
                             "max_response_tokens_per_sample": stats["supervised"]["max"]}
    run = out / "run"
    cli = [py, "-m", "vlsi.cli"]
    steps["teacher verbalize"] = run_measured([*cli, "verbalize", str(config), "--role", "teacher",
                                               "--out", str(run / "1-teacher-verbalize")], out / "verbalize_t.log")
    steps["student verbalize"] = run_measured([*cli, "verbalize", str(config), "--role", "student",
                                               "--out", str(run / "2-student-verbalize")], out / "verbalize_s.log")
    steps["interaction"] = run_measured([*cli, "interact", str(config),
                                         "--teacher-verbalizers", str(run / "1-teacher-verbalize"),
                                         "--student-verbalizers", str(run / "2-student-verbalize"),
                                         "--out", str(run / "3-interact")], out / "interact.log")
    # the same step with last-layer KD only (intermediate op none), for the cost of the layers
    steps["interaction, op none"] = run_measured([*cli, "interact", str(config),
                                                  "--teacher-verbalizers", str(run / "1-teacher-verbalize"),
                                                  "--student-verbalizers", str(run / "2-student-verbalize"),
                                                  "--out", str(run / "3-interact-none"),
                                                  "--set", "interaction.intermediate_op=none"],
                                                 out / "interact_none.log")
    steps["sft + export"] = run_measured([*cli, "sft", str(config), "--adapter", str(run / "3-interact" / "adapter"),
                                          "--student-verbalizers", str(run / "2-student-verbalize"),
                                          "--out", str(run / "4-sft")], out / "sft.log")
    reload = ("import torch; from transformers import AutoModelForImageTextToText as M; "
              f"m = M.from_pretrained({str(run / '4-sft' / 'model')!r}, local_files_only=True); "
              "ids = torch.tensor([[1, 2, 3, 4]]); print(m(input_ids=ids).logits.shape)")
    steps["stock reload + forward"] = run_measured([py, "-c", reload], out / "reload.log")
    report["reload_logits_shape"] = (out / "reload.log").read_text().strip().splitlines()[-1]
    report["checks"] = checks(run, student)
    for key, step_dir in (("interaction_split_s", "3-interact"), ("interaction_none_split_s", "3-interact-none")):
        rows = [json.loads(line) for line in (run / step_dir / "metrics.jsonl").read_text().splitlines()]
        split = {k.split("/", 1)[1]: v for r in rows for k, v in r.items() if k.startswith("seconds/")}
        report[key] = {k: round(v, 2) for k, v in split.items()}
    # per micro-batch: the loss and the two models' passes, without process start-up and loading
    step_s = {key: sum(report[key].values()) for key in ("interaction_split_s", "interaction_none_split_s")}
    report["vlsi_over_last_layer_kd"] = round(step_s["interaction_split_s"] / step_s["interaction_none_split_s"], 2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'step':<24} {'seconds':>8} {'peak RSS GiB':>13}")
    for name, row in steps.items():
        print(f"{name:<24} {row['seconds']:>8} {row['peak_rss_gib']:>13}")
    print("interaction step split (s):", report["interaction_split_s"])
    print("same step, op none (s):", report["interaction_none_split_s"])
    print("VLsI / last-layer KD per micro-batch:", report["vlsi_over_last_layer_kd"])
    print("checks:", json.dumps(report["checks"]))


if __name__ == "__main__":
    main()
