"""Checks that run before any training, each failure one line, and the plan of a valid run.

:func:`check_run` reads only configs, tokenizers, safetensors headers, verbalizer files and a
sample of the data, so a mistake costs seconds, not a verbalized teacher:

* model paths, ``model_type`` in the supported list, the same family for teacher and student;
* sizes: parameter counts from the safetensors headers (no weights loaded); a student larger
  than its teacher is refused (swapped paths). An interaction that reads a complete teacher
  cache needs only the teacher's ``config.json`` and tokenizer: its size is the cache's record;
* target layers of both models (explicit lists or the default rule) and ``t_s <= t_l``;
* the tokenizers agree on every id of the shared vocabulary;
* verbalizers read by a step fit their backbone and were trained on the configured layers;
* the training data: files present, a sample of records read and encoded with the student's
  tokenizer and image processor (a sample that is all bad stops the run);
* the training settings, validated by transformers (``TrainingArguments``);
* the attention kernel (``attn_implementation``) can run here (``flash_attention_2``: the
  ``flash_attn`` package and a CUDA GPU);
* the output directory is not inside a model directory;
* on CUDA, every step fits this GPU under the launch's engine (:func:`check_gpu_memory`, with
  :mod:`vlsi.train.plan`'s figures): a 72B teacher under DDP is refused here, not by an OOM after
  it loaded. On a CPU there is no per-GPU budget and nothing is checked.

The model facts (paths, shapes, target layers, parameters, shared vocabulary) are the run's
:class:`~vlsi.train.resolved.ResolvedRun`'s, read once; the checks here only compare them. The run
identity of each step directory is checked by the stages themselves
(:mod:`vlsi.train.fingerprint`). :func:`plan_lines` describes the run in a few lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlsi.errors import VlsiError
from vlsi.method.verbalizer import CONFIG_NAME, WEIGHTS_NAME
from vlsi.method.vocab import check_tokenizers
from vlsi.models.backbones import check_attn_implementation, load_tokenizer
from vlsi.models.shapes import ModelShape
from vlsi.train.config import STAGES, RunConfig
from vlsi.train.plan import ENGINES, STEPS, USABLE_FRACTION, Setup, gb, plan_step, setup_from_config
from vlsi.train.resolved import ModelFacts, ResolvedRun, resolve_run, safetensors_parameters

DATA_SAMPLE = 32  # records read and encoded before training
ENGINE_FILES = {"ddp": "accelerate_configs/multi_gpu_ddp.yaml", "zero2": "accelerate_configs/deepspeed_zero2.yaml",
                "zero3": "accelerate_configs/deepspeed_zero3.yaml", "fsdp": "accelerate_configs/fsdp.yaml"}


def check_pair(teacher: ModelFacts, student: ModelFacts) -> None:
    if teacher.model_type != student.model_type:
        raise VlsiError(f"teacher ({teacher.model_type}) and student ({student.model_type}) are different "
                        "model families; the interaction step feeds both the same inputs")
    if student.parameters > teacher.parameters:
        raise VlsiError(f"the student ({student.parameters:,} parameters) is larger than the teacher "
                        f"({teacher.parameters:,}); are teacher and student swapped?")
    check_layer_counts(student.target_layers, teacher.target_layers)


def check_layer_counts(student_layers: list[int], teacher_layers: list[int]) -> None:
    """``t_s <= t_l``: every student target layer needs its own teacher layer."""
    if len(student_layers) > len(teacher_layers):
        raise VlsiError(
            f"the student has more target layers than the teacher (t_s={len(student_layers)} "
            f"{student_layers} > t_l={len(teacher_layers)} {teacher_layers}); matching needs t_s <= t_l")


def check_verbalizers(path: str | Path, facts: ModelFacts, role: str, configured: list[int] | None) -> list[int]:
    """Saved verbalizers fit ``facts``'s backbone (and explicitly ``configured`` target layers,
    if any); returns their layers."""
    d = Path(path)
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise VlsiError(f"{role} verbalizers not found: {d} has no {CONFIG_NAME} + {WEIGHTS_NAME} "
                        f"(run `vlsi verbalize CONFIG --role {role}` first)")
    try:
        saved = json.loads((d / CONFIG_NAME).read_text())
        layers = [int(i) for i in saved["layers"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise VlsiError(f"{d / CONFIG_NAME}: cannot read the target layers ({err})") from None
    want = {"model_type": facts.model_type, "hidden_size": facts.hidden_size,
            "num_layers": facts.num_layers, "vocab_size": facts.vocab_size}
    have = saved.get("backbone", {})
    diffs = [f"{k}: verbalizers {have[k]!r} vs {role} {v!r}" for k, v in want.items() if k in have and have[k] != v]
    if diffs:
        raise VlsiError(f"{d}: these verbalizers do not fit the {role} ({'; '.join(diffs)})")
    if configured is not None and sorted(layers) != sorted(configured):
        raise VlsiError(f"{d}: trained on {role} layers {layers}, but verbalizer.{role}_layers is "
                        f"{sorted(configured)}; retrain them or fix the config")
    bad = [i for i in layers if not 0 <= i < facts.num_layers - 1]
    if bad:
        raise VlsiError(f"{d}: target layers {bad} do not exist below the last layer of the "
                        f"{facts.num_layers}-layer {role}")
    return layers


def check_data(cfg: RunConfig, model: Path) -> str:
    """Data files present; a sample read and encoded. Returns a one-line description."""
    from itertools import islice

    from vlsi.data.encode import SampleEncoder
    from vlsi.data.records import Rejected, iter_parsed
    from vlsi.models.backbones import ImageEncoder

    for f in cfg.data.train:
        if not Path(f).is_file():
            raise VlsiError(f"data.train: {f} not found")
    if cfg.data.image_root and not Path(cfg.data.image_root).is_dir():
        raise VlsiError(f"data.image_root: {cfg.data.image_root} is not a directory")
    encoder = SampleEncoder(load_tokenizer(model), ImageEncoder.from_pretrained(
        model, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels), cfg.data.max_length)
    good, bad, seen = 0, [], 0
    for path in cfg.data.train:
        for sample_id, _record, parsed in islice(iter_parsed(path, cfg.data.image_root), DATA_SAMPLE - seen):
            seen += 1
            try:
                if isinstance(parsed, Rejected):
                    raise parsed
                encoder.encode(parsed)
                good += 1
            except Rejected as err:
                bad.append(f"{sample_id}: {err.reason}")
        if seen >= DATA_SAMPLE:
            break
    if not good:
        raise VlsiError(f"data.train: none of the first {seen} records is usable "
                        f"(first: {bad[0] if bad else 'the files hold no record'})")
    return f"a sample of {seen} records: {good} usable"


def check_output_dir(out: Path, models: list[Path]) -> None:
    resolved = out.resolve()
    for model in models:
        m = model.resolve()
        if resolved == m or m in resolved.parents:
            raise VlsiError(f"output_dir {out} is inside the model directory {model}; choose a "
                            "directory of its own")


def launch_engine(args: Any) -> tuple[str, str]:
    """``(plan engine, name)`` of this launch, from its ``TrainingArguments``.

    The DeepSpeed plugin's ZeRO stage (``zero3``; ``zero2``; ZeRO-0/1 keep whole gradients:
    ``ddp``), else FSDP (``TrainingArguments.fsdp`` or accelerate's ``ACCELERATE_USE_FSDP``),
    else ``ddp``; the name counts the processes, e.g. ``DDP x 8``.
    """
    world = args.world_size
    if args.deepspeed_plugin is not None:
        stage = int(args.deepspeed_plugin.zero_stage)
        engine, name = {3: "zero3", 2: "zero2"}.get(stage, "ddp"), f"ZeRO-{stage}"
    elif args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        engine, name = "fsdp", "FSDP"
    else:
        engine, name = "ddp", "DDP" if world > 1 else "one process"
    return engine, f"{name} x {world}" if world > 1 else name


def gpu_memory(args: Any) -> int | None:
    """Bytes of this process's GPU (``torch.cuda.mem_get_info``); ``None`` on a CPU run."""
    import torch

    if args.use_cpu or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(args.device)[1])


def check_fit(steps: tuple[str, ...], teacher: ModelShape | None, student: ModelShape | None, setup: Setup,
              gpu_bytes: int, launch: str) -> None:
    """Refuse the first of ``steps`` whose planned bytes per GPU exceed ``USABLE_FRACTION`` of
    ``gpu_bytes``: one line with the step, the prediction and its largest part, the GPU, and the
    first engine (least sharded) under which every step of ``steps`` fits."""
    usable = USABLE_FRACTION * gpu_bytes
    planned = [step for step in STEPS if step in steps]
    over = next((p for p in (plan_step(s, teacher, student, setup) for s in planned) if p.total > usable), None)
    if over is None:
        return
    fits = [e for e in ENGINES if e != setup.engine and all(
        plan_step(s, teacher, student, replace(setup, engine=e)).total <= usable for s in planned)]
    part, size = max(over.parts.items(), key=lambda item: item[1])
    fix = (f"{fits[0]} would fit ({ENGINE_FILES[fits[0]]})" if fits else
           f"no engine fits {setup.gpus} such GPU(s) (`vlsi plan CONFIG --gpus N --gpu-memory SIZE` says what would)")
    raise VlsiError(f"{over.step}: predicted {gb(over.total)} per GPU under {launch} ({part} {gb(size)}), more than "
                    f"the {gb(usable)} usable of this GPU's {gb(gpu_bytes)} (`vlsi plan` lists every part); {fix}")


def check_gpu_memory(cfg: RunConfig, steps: tuple[str, ...], teacher: ModelShape | None,
                     student: ModelShape | None, args: Any) -> None:
    """On CUDA, :func:`check_fit` for this launch (engine and processes from ``args``, the
    stage's ``TrainingArguments``); nothing on a CPU run."""
    gpu_bytes = gpu_memory(args)
    if gpu_bytes is None:
        return
    engine, launch = launch_engine(args)
    check_fit(steps, teacher, student, setup_from_config(cfg, args.world_size, engine), gpu_bytes, launch)


@dataclass
class Preflight:
    """What :func:`check_run` found: the models' facts (target layers as their verbalizers have
    them, where a step reads verbalizers), the shared vocabulary (with a teacher) and the data line."""

    teacher: ModelFacts | None
    student: ModelFacts
    vocab: int | None
    data: str


def check_run(run: RunConfig | ResolvedRun, steps: tuple[str, ...], *, out: Path | None = None,
              teacher_verbalizers: Path | None = None, student_verbalizers: Path | None = None,
              memory: bool = True) -> Preflight:
    """Every check of the module docstring that applies to ``steps``
    (``teacher-verbalize``, ``student-verbalize``, ``interact``, ``sft``); ``memory=False``
    leaves out the GPU memory check (``cache-teacher`` places its teacher itself). The model
    facts come from ``run`` (a config is resolved here, :func:`vlsi.train.resolved.resolve_run`)."""
    from vlsi.train.stages.arguments import check_arguments

    run = resolve_run(run)
    cfg = run.cfg
    check_attn_implementation(cfg.attn_implementation)
    needs_teacher = any(s in steps for s in ("teacher-verbalize", "interact"))
    student = run.student
    teacher = None
    if needs_teacher:  # a complete teacher cache stands in for the weights of an interaction's teacher
        if "interact" not in steps and run.teacher_cache is not None:
            safetensors_parameters(run.teacher_dir)  # without the interaction, only the weights count
        teacher = run.teacher
    vocab = None
    if teacher is not None:
        check_pair(teacher, student)
        vocab = run.shared_vocab
        check_tokenizers(load_tokenizer(teacher.path), load_tokenizer(student.path), vocab)
    if teacher_verbalizers is not None and teacher is not None:
        teacher = replace(teacher, target_layers=check_verbalizers(teacher_verbalizers, teacher, "teacher",
                                                                   run.configured_layers("teacher")))
    if student_verbalizers is not None:
        student = replace(student, target_layers=check_verbalizers(student_verbalizers, student, "student",
                                                                   run.configured_layers("student")))
    if teacher is not None and (teacher_verbalizers or student_verbalizers):
        check_layer_counts(student.target_layers, teacher.target_layers)
    args = None
    for name in STAGES:
        if name == "interact" and "interact" not in steps:
            continue
        args = check_arguments(cfg.stage(name), name)
    if memory and gpu_memory(args) is not None:
        check_gpu_memory(cfg, steps, run.plan_shape("teacher", teacher.target_layers) if teacher else None,
                         run.plan_shape("student", student.target_layers), args)
    data = check_data(cfg, student.path)
    if out is not None:
        check_output_dir(out, [student.path] + ([teacher.path] if teacher else []))
    return Preflight(teacher, student, vocab, data)


def plan_lines(cfg: RunConfig, pre: Preflight, steps: list[tuple[str, Path]]) -> list[str]:
    """A short plan: models, layers, matching, data, and each step's budget."""
    def model(f: ModelFacts) -> str:
        return (f"{f.path} ({f.model_type}, {f.parameters / 1e9:.2f}B parameters, {f.num_layers} "
                f"layers x {f.hidden_size}; target layers {f.target_layers})")

    def budget(name: str) -> str:
        t = cfg.stage(name)
        length = f"{t.max_steps} steps" if t.max_steps > 0 else f"{t.num_train_epochs:g} epochs"
        return (f"{length}, batch {t.per_device_train_batch_size} x {t.gradient_accumulation_steps} "
                f"accumulation per device, lr {t.learning_rate:g} -> {t.min_learning_rate:g}")

    lines = []
    if pre.teacher is not None:
        lines.append(f"teacher: {model(pre.teacher)}")
    lines.append(f"student: {model(pre.student)}")
    if pre.vocab is not None:
        i = cfg.interaction
        lines.append(f"shared vocabulary {pre.vocab:,}; matching {i.strategy} (temperature "
                     f"{i.temperature_rule}), ops {i.intermediate_op}/{i.last_op}; LoRA r={cfg.lora.r}")
    lines.append(f"data: {', '.join(cfg.data.train)} ({pre.data})")
    stage_of = {"teacher-verbalize": "verbalize", "student-verbalize": "verbalize",
                "interact": "interact", "sft": "sft"}
    for step, path in steps:
        lines.append(f"  {step}: {budget(stage_of[step])} -> {path}")
    return lines
