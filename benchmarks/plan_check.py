"""`vlsi plan`'s per-step predictions against the peaks measured by benchmarks/real_shapes.py.

    python benchmarks/real_shapes.py --out runs/real
    python benchmarks/plan_check.py --measured runs/real/report.json --out docs/bench/plan_check_cpu.json

The measured run (Qwen2-VL-7B-shaped teacher of 4 layers, 2B-shaped student of 3, bf16
checkpoints, one CPU process, batch 1, no gradient checkpointing, no bf16 mixed precision)
recorded each step's peak RSS and its data's longest sample and response in tokens; the plan
is computed for the same settings with those token counts. Three facts of a CPU process that a
GPU plan does not hold are added before comparing, each printed:

* every step process also holds the interpreter, torch and transformers: the peak RSS of a
  process that imports the stages and the model class and loads nothing, measured here;
* the weights are memory-mapped from safetensors, so the rows of an untied input embedding that
  no token reads are never resident (on a GPU they are copied whole): the teacher's embedding
  is subtracted (the student ties it to its LM head, which the loss reads whole);
* the SFT process also exports: it loads the student a second time on the CPU to merge LoRA
  into (:mod:`vlsi.train.export`), one more copy of its weights.

Prints one line per step and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

STEPS = {"teacher-verbalize": "teacher verbalize", "student-verbalize": "student verbalize",
         "interact": "interaction", "sft": "sft + export"}
IMPORTS = ("import torch, transformers, vlsi.train.stages.verbalize, vlsi.train.stages.interact, vlsi.train.stages.sft; "
           "from transformers import Qwen2VLForConditionalGeneration")


def baseline_rss() -> int:
    """Peak RSS (bytes) of a child that imports what a step imports and loads nothing."""
    proc = subprocess.Popen([sys.executable, "-c", IMPORTS], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("the baseline process failed")
    return usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measured", type=Path, required=True, help="report.json of benchmarks/real_shapes.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from vlsi.models.real_shapes import real_shape_config
    from vlsi.models.shapes import shape_from_config
    from vlsi.train.plan import Setup, plan_steps

    measured = json.loads(args.measured.read_text())

    class _Ids:
        def convert_tokens_to_ids(self, token: str) -> int:
            return 0

    shapes = {}
    for role, size, layers in (("teacher", "7b", measured["teacher_layers"]), ("student", "2b", measured["student_layers"])):
        config = real_shape_config(size, _Ids(), num_layers=layers)
        config.dtype = "bfloat16"  # the run saved its random checkpoints in bf16
        shapes[role] = shape_from_config(config, f"Qwen2-VL-{size.upper()} shape, {layers} layers")
        shapes[role].target_layers = list(range(layers - 1))  # benchmarks/real_shapes.py's choice
    tokens = measured["data_tokens"]
    setup = Setup(gpus=1, engine="ddp", batch={"verbalize": 1, "interact": 1, "sft": 1},
                  checkpointing={"verbalize": False, "interact": False, "sft": False},
                  max_length=tokens["max_tokens_per_sample"], chunk_size=256, lora_r=64, autocast=False,
                  response_tokens=tokens["max_response_tokens_per_sample"])
    base = baseline_rss()
    teacher_embedding = shapes["teacher"].vocab_size * shapes["teacher"].hidden_size * 2
    student_copy = shapes["student"].parameters * shapes["student"].weight_bytes
    cpu_facts = {"teacher-verbalize": -teacher_embedding, "student-verbalize": 0,
                 "interact": -teacher_embedding, "sft": student_copy}
    rows = []
    print(f"longest sample {setup.max_length} tokens, longest response {setup.response_tokens}")
    print(f"baseline (imports only): {base / 2**30:.2f} GiB; untouched teacher embedding "
          f"{teacher_embedding / 2**30:.2f} GiB; the export's student copy {student_copy / 2**30:.2f} GiB")
    print(f"{'step':<18} {'plan GiB':>9} {'CPU facts':>10} {'predicted':>10} {'measured':>9} {'pred/meas':>10}")
    for step in plan_steps(shapes["teacher"], shapes["student"], setup):
        peak = measured["steps"][STEPS[step.step]]["peak_rss_gib"] * 2**30
        facts = base + cpu_facts[step.step]
        predicted = step.total + facts
        rows.append({"step": step.step, "plan_bytes": step.total, "parts": step.parts, "cpu_facts_bytes": facts,
                     "predicted_bytes": predicted, "measured_bytes": int(peak), "ratio": predicted / peak})
        print(f"{step.step:<18} {step.total / 2**30:>9.2f} {facts / 2**30:>+10.2f} {predicted / 2**30:>10.2f} "
              f"{peak / 2**30:>9.2f} {predicted / peak:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"baseline_bytes": base, "measured_from": str(args.measured), "rows": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
