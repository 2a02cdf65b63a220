"""``vlsi distill CONFIG``: the whole VLsI pipeline into one output directory.

    vlsi distill configs/qwen2vl-72b-to-7b.yaml [--no-resume] [--set training.max_steps=100]

Four steps, one sub-directory each, under the config's ``output_dir``::

    config.yaml                the resolved config of the latest invocation
    1-teacher-verbalize/       verbalizers of the teacher (verbalizers.safetensors + .json)
    2-student-verbalize/       verbalizers of the student
    3-interact/                adapter/ (the student's LoRA), matches.json, heatmaps
    4-sft/                     adapter/, model/ (the exported student, model/verbalizers/)

With ``interaction.teacher_cache: DIR`` a fifth step runs before the interaction: ``vlsi
cache-teacher`` into DIR (skipped when DIR holds a complete cache of the same inputs), and the
interaction step reads the teacher from it. Once the cache and the teacher verbalization are
complete, the teacher's directory needs only its ``config.json`` and tokenizer files.

The run is resolved once (:func:`vlsi.train.resolved.resolve_run`: paths, model facts, identities)
and every step reads that object. Before anything trains, every check of :mod:`vlsi.train.preflight` runs and a short plan is printed.
Every step directory records what its result depends on (``fingerprint.json``,
:mod:`vlsi.train.fingerprint`); a directory that holds a result of other inputs stops the run with one
line naming what differs, unless ``--restart-changed``, which redoes the first changed step and
every step after it. ``config.yaml`` is written only then, so it always describes what is on
disk. A finished step with the same inputs is never run again; an unfinished one continues
from its newest complete checkpoint (``--no-resume``: it starts over). One status line per
step is printed, by the main process only.

Launch it like any stage (``accelerate launch -m vlsi.cli distill CONFIG``): every process runs
the same steps, and each step's Trainer shares the work.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vlsi.errors import VlsiError
from vlsi.train import fingerprint
from vlsi.train.config import RunConfig, dump_config
from vlsi.train.distributed import is_main_process
from vlsi.train.preflight import check_run, plan_lines
from vlsi.train.resolved import ResolvedRun, RunLayout, resolve_run  # noqa: F401 (RunLayout re-exported)
from vlsi.train.stages.checkpoints import latest_checkpoint
from vlsi.train.stages.run import STEP_COMPLETE, stage_complete
from vlsi.train.teacher_cache import cache_complete

CONFIG_FILE = "config.yaml"


def layout(cfg: RunConfig | ResolvedRun) -> RunLayout:
    """The step directories of ``cfg``'s run (:attr:`ResolvedRun.layout`)."""
    return resolve_run(cfg).layout


def step_plan(run: RunConfig | ResolvedRun) -> list[tuple[str, Path, dict[str, Any]]]:
    """``(step, directory, inputs)`` of the four steps; each step's inputs name the earlier
    steps it reads by the digest their fingerprint will have, so all are known up front."""
    run = resolve_run(run)
    paths = run.layout
    teacher = fingerprint.step_inputs(run, "teacher-verbalize")
    student = fingerprint.step_inputs(run, "student-verbalize")
    verbalizers = {"teacher_verbalizers": "step:" + fingerprint.digest(teacher),
                   "student_verbalizers": "step:" + fingerprint.digest(student)}
    interact = fingerprint.step_inputs(run, "interact", verbalizers)
    sft = fingerprint.step_inputs(run, "sft", {"adapter": "step:" + fingerprint.digest(interact),
                                               "student_verbalizers": verbalizers["student_verbalizers"]})
    return [("teacher-verbalize", paths.teacher_verbalize, teacher),
            ("student-verbalize", paths.student_verbalize, student),
            ("interact", paths.interact, interact), ("sft", paths.sft, sft)]


def first_changed(plan: list[tuple[str, Path, dict[str, Any]]]) -> tuple[int, list[str]] | None:
    """Index of the first step whose directory holds a result of other inputs, and the diffs."""
    for k, (_, step_dir, inputs) in enumerate(plan):
        diffs = fingerprint.changed_or_unrecorded(step_dir, inputs)
        if diffs:
            return k, diffs
    return None


def run_distill(run: RunConfig | ResolvedRun, *, resume: bool = True, restart_changed: bool = False) -> Path:
    """Check everything, then run the unfinished steps in order; returns the exported student.

    ``run``: the run (a config is resolved here, :func:`vlsi.train.resolved.resolve_run`); every step
    reads the same resolved facts. A step directory that holds a result of other inputs stops
    the run before anything trains (one line naming what differs), unless ``restart_changed``:
    then that step and every later one are removed and run again, the earlier ones kept.
    """
    from vlsi.train.stages.cache_teacher import run_cache_teacher
    from vlsi.train.stages.interact import run_interact
    from vlsi.train.stages.sft import run_sft
    from vlsi.train.stages.verbalize import run_verbalize

    run = resolve_run(run)
    cfg, paths = run.cfg, run.layout
    main = is_main_process()
    pre = check_run(run, ("teacher-verbalize", "student-verbalize", "interact", "sft"), out=paths.root)
    plan = step_plan(run)
    changed = first_changed(plan)
    if changed is not None:
        k, diffs = changed
        if not restart_changed:
            kept = ", ".join(d.name for _, d, _ in plan[:k]) or "none"
            raise fingerprint.refusal(plan[k][1], diffs, f"rerun with --restart-changed to redo it "
                                      f"and the steps after it (keeping {kept})")
        if main:
            print(f"inputs changed at {plan[k][1].name} ({'; '.join(diffs[:2])}); redoing it and "
                  "the steps after it", flush=True)
            for _, step_dir, _ in plan[k:]:
                shutil.rmtree(step_dir, ignore_errors=True)
    if main:
        for line in plan_lines(cfg, pre, [(step, d) for step, d, _ in plan]):
            print(line, flush=True)
        paths.root.mkdir(parents=True, exist_ok=True)
        (paths.root / CONFIG_FILE).write_text(dump_config(cfg))

    upstream = {name: inputs for name, _, inputs in plan}
    steps: list[tuple[str, Path, Callable[[bool], object]]] = [
        ("teacher verbalization", paths.teacher_verbalize,
         lambda r: run_verbalize(run, "teacher", paths.teacher_verbalize, resume=r)),
        ("student verbalization", paths.student_verbalize,
         lambda r: run_verbalize(run, "student", paths.student_verbalize, resume=r)),
    ]
    if run.teacher_cache is not None:
        cache = run.teacher_cache
        steps.append(("teacher cache", cache,
                      lambda r: run_cache_teacher(run, cache, teacher_verbalizers=paths.teacher_verbalize,
                                                  top_k=cfg.interaction.teacher_cache_top_k, preflight=pre)))
    steps += [
        ("interaction", paths.interact,
         lambda r: run_interact(run, paths.interact, teacher_verbalizers=paths.teacher_verbalize,
                                student_verbalizers=paths.student_verbalize, resume=r, preflight=pre,
                                upstream={k: upstream["interact"][k] for k in
                                          ("teacher_verbalizers", "student_verbalizers")})),
        ("SFT and export", paths.sft,
         lambda r: run_sft(run, paths.sft, adapter=paths.interact_adapter,
                           student_verbalizers=paths.student_verbalize, resume=r, preflight=pre,
                           upstream={k: upstream["sft"][k] for k in ("adapter", "student_verbalizers")})),
    ]
    # Decide every step's fate before running any, so all processes take the same decisions.
    plans = [_plan(step_dir, resume, _done_check(name)) for name, step_dir, _ in steps]
    running_teacher = [name for (name, _, _), decision in zip(steps, plans)
                       if decision.action != "skip" and name in ("teacher verbalization", "teacher cache")]
    if running_teacher and not any(pre.teacher.path.glob("*.safetensors")):  # a complete cache stood in
        raise VlsiError(f"{pre.teacher.path}: no *.safetensors weights, which the unfinished {running_teacher[0]} "
                        "step needs")
    for k, ((name, step_dir, run_step), decision) in enumerate(zip(steps, plans), start=1):
        if main:
            print(f"[{k}/{len(steps)}] {name}: {decision.describe(step_dir)}", flush=True)
        if decision.action == "skip":
            continue
        if decision.action == "restart" and main:
            shutil.rmtree(step_dir)
        run_step(decision.action == "resume")
        if main and not _done_check(name)(step_dir):
            raise VlsiError(f"{name} returned without writing {step_dir / STEP_COMPLETE}")
    if main:
        print(f"done: the distilled student is {paths.model}", flush=True)
    return paths.model


@dataclass(frozen=True)
class _Plan:
    action: str  # "skip", "start", "resume" or "restart"
    checkpoint: str | None = None

    def describe(self, step_dir: Path) -> str:
        if self.action == "skip":
            return f"done, skipped ({step_dir})"
        if self.action == "resume":
            return f"resuming from {self.checkpoint}"
        if self.action == "restart":
            return f"restarting: removing the unfinished {step_dir} (--no-resume)"
        return f"starting ({step_dir})"


def _done_check(name: str) -> Callable[[Path], bool]:
    """How a step shows it is finished: ``step_complete.json``, or a complete cache manifest."""
    return cache_complete if name == "teacher cache" else stage_complete


def _plan(step_dir: Path, resume: bool, done: Callable[[Path], bool] = stage_complete) -> _Plan:
    if done(step_dir):
        return _Plan("skip")
    checkpoint = latest_checkpoint(step_dir)
    if checkpoint is not None and resume:
        return _Plan("resume", checkpoint)
    if step_dir.exists() and any(p.name != fingerprint.FINGERPRINT for p in step_dir.iterdir()) and not resume:
        return _Plan("restart")
    return _Plan("start")
