"""The ``vlsi`` command line: sub-commands mapped to functions of the package.

    vlsi tiny OUT_DIR [--family qwen2_vl]     build an offline tiny teacher/student pair
    vlsi data synth OUT_DIR [--seed 0 ...]    write the synthetic visual-instruction dataset
    vlsi data check FILE --model DIR          validate a dataset, print counts and skips
    vlsi bench loss [...]                     chunked vs naive interaction-loss benchmark
    vlsi demo [--quick] [--seeds 3] [--pair DIR]   the method's claim on tiny models, with a report
    vlsi demo pretrain [--regime lists] --out DIR   rebuild the demo's pretrained pair from scratch
    vlsi demo regime CONFIG TEACHER_VERBALIZERS   what the distillation targets hold beyond the labels
    vlsi ablate [--only b d e f g] [--seeds 3]  the paper's Table 4 at tiny scale, and on-policy
    vlsi generate --model DIR --image IMG --prompt TEXT [--num-beams N]
    vlsi verbalize-layers --model DIR --verbalizers DIR --image IMG --prompt TEXT --out F.html
    vlsi eval --model DIR --data FILE         MC accuracy / exact match (JSON or MMBench TSV)

Training (CONFIG is a run's YAML file, see ``vlsi.train.config``; ``--set a.b=value`` overrides a key,
the value read as YAML; default directories follow the ``vlsi distill`` layout under the
config's ``output_dir``, see ``vlsi.train.stages.distill``):

    vlsi verbalize CONFIG --role {teacher,student} [--out DIR] [--resume]
    vlsi interact CONFIG [--teacher-verbalizers DIR] [--student-verbalizers DIR] [--teacher-cache DIR] [--out DIR]
    vlsi sft CONFIG [--adapter DIR] [--student-verbalizers DIR] [--out DIR] [--resume]
    vlsi distill CONFIG [--no-resume] [--restart-changed]   all four steps into one output directory
    vlsi cache-teacher CONFIG [--out DIR] [--top-k K]   the teacher's top-K log-probabilities, offline
    vlsi plan CONFIG --gpus N --gpu-memory 80GB --engine zero3   per-GPU memory of every step
    vlsi config CONFIG                          the resolved config, every key with its help

User errors (:class:`vlsi.errors.VlsiError`) print one line, ``error: ...``, and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml

from vlsi import __version__
from vlsi.cli_types import positive_int
from vlsi.errors import VlsiError
from vlsi.models.families import FAMILIES


def _offline() -> None:
    """Models load from local paths only: never let a typo turn into a hub download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cmd_tiny(args: argparse.Namespace) -> None:
    from vlsi.models.tiny import save_tiny_pair

    pair = save_tiny_pair(args.out_dir, args.family, seed=args.seed, force=args.force)
    print(f"teacher: {pair.teacher}\nstudent: {pair.student}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from vlsi.demo.run import run_demo

    if args.teacher_from:
        raise VlsiError("--teacher-from is for `vlsi demo pretrain`")
    run_demo(args.out, quick=args.quick, seeds=args.seeds, seed=args.seed, pair_dir=args.pair,
             command=" ".join(["vlsi", *args.argv]), teacher_map=args.teacher_map, regime=args.regime,
             label_noise=args.label_noise)


def _refuse_demo_run_options(args: argparse.Namespace, what: str) -> None:
    """`vlsi demo`'s own options written before a sub-command that does not take them: one line."""
    given = [name for name, default in DEMO_RUN_DEFAULTS.items() if getattr(args, name) != default]
    if given:
        raise VlsiError(f"--{given[0].replace('_', '-')} is for `vlsi demo`; {what}")


def _cmd_demo_pretrain(args: argparse.Namespace) -> None:
    from vlsi.demo.run import run_pretrain

    _refuse_demo_run_options(args, "`vlsi demo pretrain` builds a pair into --out")
    run_pretrain(args.out, quick=args.quick, teacher_from=args.teacher_from, regime=args.regime)


def _cmd_demo_regime(args: argparse.Namespace) -> None:
    from vlsi.demo.regime import measure_regime
    from vlsi.train.config import load_config

    _refuse_demo_run_options(args, "`vlsi demo regime` measures a run config's targets")
    regime = measure_regime(load_config(args.config), _existing_dir(Path(args.teacher_verbalizers), "teacher "
                            "verbalizers", "check TEACHER_VERBALIZERS"), args.samples)
    print(json.dumps(regime, indent=2))


def _cmd_ablate(args: argparse.Namespace) -> None:
    from vlsi.demo.ablate import run_ablate

    run_ablate(args.out, only=args.only, seeds=args.seeds, quick=args.quick, pair_dir=args.pair,
               command=" ".join(["vlsi", *args.argv]), regime=args.regime)


def _cmd_generate(args: argparse.Namespace) -> None:
    from vlsi.tools.inference import Generator, Prompt, resolve_device

    _existing_files(args.image or [], "image")  # before the model loads
    device, dtype = resolve_device(args.device)
    generator = Generator.from_pretrained(_existing_dir(Path(args.model), "model", "check --model"),
                                          dtype=dtype, device=device)
    [answer] = generator.generate([Prompt(args.prompt, list(args.image or []))],
                                  max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    print(answer)


def _cmd_verbalize_layers(args: argparse.Namespace) -> None:
    from vlsi.tools.layer_view import run_verbalize_layers

    compare = [tuple(pair) for pair in (args.compare or [])]
    _existing_files([args.image] if args.image else [], "image")
    run_verbalize_layers(_existing_dir(Path(args.model), "model", "check --model"),
                         _existing_dir(Path(args.verbalizers), "verbalizers", "check --verbalizers"),
                         args.image, args.prompt, args.out, compare=compare,
                         max_new_tokens=args.max_new_tokens, device=args.device)


def _cmd_eval(args: argparse.Namespace) -> None:
    from vlsi.tools.evaluate import run_eval

    run_eval(_existing_dir(Path(args.model), "model", "check --model"), args.data,
             image_root=args.image_root, out=args.out, batch_size=args.batch_size,
             max_new_tokens=args.max_new_tokens, limit=args.limit, device=args.device)


def _load_config(args: argparse.Namespace, overrides: dict[str, Any] | None = None):
    """The config of ``args.config`` with the ``--set`` overrides, then ``overrides`` (from the
    command's own options), applied before validation."""
    from vlsi.train.config import load_config

    return load_config(args.config, {**parse_overrides(args.set), **(overrides or {})})


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["training.max_steps=10", "data.train=[a.json]"]`` -> ``{key: YAML-parsed value}``."""
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise VlsiError(f"--set {item!r}: expected KEY=VALUE, e.g. training.max_steps=100")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise VlsiError(f"--set {item!r}: the value is not valid YAML") from None
    return overrides


def _existing_dir(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise VlsiError(f"{what} not found: {path} ({hint})")
    return path


def _existing_files(paths: list[str], what: str) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise VlsiError(f"{what} not found: {path}")


def _cmd_verbalize(args: argparse.Namespace) -> None:
    from vlsi.train.resolved import resolve_run
    from vlsi.train.stages.verbalize import run_verbalize

    run = resolve_run(_load_config(args))
    out = Path(args.out) if args.out else run.layout.verbalize_dir(args.role)
    done = run_verbalize(run, args.role, out, resume=args.resume, restart=args.restart_changed)
    print(f"verbalize ({args.role}): {done}")


def _cmd_interact(args: argparse.Namespace) -> None:
    from vlsi.train.resolved import resolve_run
    from vlsi.train.stages.interact import run_interact

    # before validation: what the cache rules out (e.g. on_policy) fails there
    cfg = _load_config(args, {"interaction.teacher_cache": args.teacher_cache} if args.teacher_cache else None)
    run = resolve_run(cfg)
    teacher = _existing_dir(Path(args.teacher_verbalizers or run.layout.teacher_verbalize), "teacher verbalizers",
                           "run `vlsi verbalize CONFIG --role teacher` or pass --teacher-verbalizers")
    student = _existing_dir(Path(args.student_verbalizers or run.layout.student_verbalize), "student verbalizers",
                           "run `vlsi verbalize CONFIG --role student` or pass --student-verbalizers")
    out = Path(args.out) if args.out else run.layout.interact
    result = run_interact(run, out, teacher_verbalizers=teacher, student_verbalizers=student,
                          resume=args.resume, restart=args.restart_changed)
    print(f"interact: {result}")


def _cmd_cache_teacher(args: argparse.Namespace) -> None:
    from vlsi.train.resolved import resolve_run
    from vlsi.train.stages.cache_teacher import run_cache_teacher

    run = resolve_run(_load_config(args))
    teacher = _existing_dir(Path(args.teacher_verbalizers or run.layout.teacher_verbalize), "teacher verbalizers",
                           "run `vlsi verbalize CONFIG --role teacher` or pass --teacher-verbalizers")
    out = Path(args.out or run.teacher_cache or run.layout.teacher_cache)
    top_k = args.top_k or run.cfg.interaction.teacher_cache_top_k
    print(f"cache-teacher: {run_cache_teacher(run, out, teacher_verbalizers=teacher, top_k=top_k, storage=args.storage, samples_per_shard=args.samples_per_shard)}")


def _cmd_sft(args: argparse.Namespace) -> None:
    from vlsi.train.resolved import resolve_run
    from vlsi.train.stages.sft import run_sft

    run = resolve_run(_load_config(args))
    paths = run.layout
    if args.adapter:
        adapter: Path | None = _existing_dir(Path(args.adapter), "LoRA adapter", "check --adapter")
    elif paths.interact_adapter.is_dir():
        adapter = paths.interact_adapter
    else:
        adapter = None
        print(f"sft: no interaction adapter at {paths.interact_adapter}; training a fresh LoRA")
    if args.student_verbalizers:
        verbalizers: Path | None = _existing_dir(Path(args.student_verbalizers), "student verbalizers",
                                                 "check --student-verbalizers")
    elif (paths.student_verbalize / "verbalizers.json").is_file():
        verbalizers = paths.student_verbalize
    else:
        verbalizers = None
        print(f"sft: no student verbalizers at {paths.student_verbalize}; exporting the model alone")
    out = Path(args.out) if args.out else paths.sft
    model_dir = run_sft(run, out, adapter=adapter, student_verbalizers=verbalizers, resume=args.resume,
                        restart=args.restart_changed)
    print(f"sft: exported {model_dir}")


def _cmd_distill(args: argparse.Namespace) -> None:
    from vlsi.train.resolved import resolve_run
    from vlsi.train.stages.distill import run_distill

    run_distill(resolve_run(_load_config(args)), resume=args.resume, restart_changed=args.restart_changed)


def _cmd_config(args: argparse.Namespace) -> None:
    from vlsi.train.config import describe_config

    print(describe_config(_load_config(args)))


def _cmd_plan(args: argparse.Namespace) -> None:
    from vlsi.train.plan import run_plan
    from vlsi.train.resolved import resolve_run

    lines = run_plan(resolve_run(_load_config(args)), gpus=args.gpus, gpu_memory=args.gpu_memory, engine=args.engine,
                     teacher_shape=args.teacher_shape, student_shape=args.student_shape,
                     response_tokens=args.response_tokens)
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Arguments: one function per command, then the table of commands
# ---------------------------------------------------------------------------------------------

DEVICE_HELP = "cpu, cuda or cuda:N (default: the GPU, in bf16, when there is one)"


def _add_run_args(parser: argparse.ArgumentParser, *, out: bool = True, restart: bool = True) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                        help="override a config key (value read as YAML), e.g. training.max_steps=10; "
                             "repeatable")
    if restart:
        parser.add_argument("--restart-changed", action="store_true",
                            help="redo a step whose recorded inputs differ from this config's (by "
                                 "default that is refused); earlier steps are kept")
    if out:
        parser.add_argument("--out", metavar="DIR", help="output directory (default: the distill layout "
                                                         "under the config's output_dir)")
        parser.add_argument("--resume", action="store_true",
                            help="continue from the newest checkpoint in the output directory")


def _default(value: Any, defaults: bool) -> dict[str, Any]:
    """``default=value`` for ``add_argument``, or nothing: a sub-command whose parent holds the defaults."""
    return {"default": value} if defaults else {}


def _add_regime_arg(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    from vlsi.demo.recipe import DEFAULT_REGIME, REGIMES

    parser.add_argument("--regime", choices=sorted(REGIMES), **_default(DEFAULT_REGIME, defaults),
                        help=f"task and pair (default {DEFAULT_REGIME}; docs/demo.md): 'lists' "
                             "(free-form lists, right in any order; 5-layer student, 10-layer "
                             "teacher) or 'counts' (one-digit counts; 2-layer student)")


def _add_demo_args(parser: argparse.ArgumentParser, out: str, defaults: bool = True) -> None:
    parser.add_argument("--out", **_default(out, defaults), help="output directory (a rerun resumes it)")
    parser.add_argument("--quick", action="store_true", help="a fraction of the budget (plumbing check)")
    parser.add_argument("--seeds", type=positive_int, **_default(DEMO_RUN_DEFAULTS["seeds"], defaults),
                        help="distillation seeds (default 3): mean ± std and the paired verdict")
    parser.add_argument("--pair", metavar="DIR", help="a pair built by `vlsi demo pretrain` (default: "
                                                      "the regime's shipped one)")
    _add_regime_arg(parser, defaults)


def _args_tiny(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="qwen2_vl", choices=sorted(FAMILIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild a pair of other settings already in OUT_DIR")


def _args_data(parser: argparse.ArgumentParser) -> None:
    from vlsi.data import check, synthetic

    commands = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synthetic.add_cli(commands)
    check.add_cli(commands)


def _args_bench(parser: argparse.ArgumentParser) -> None:
    from vlsi.tools import bench

    bench.add_cli(parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH"))


# `vlsi demo`'s options that `vlsi demo pretrain` refuses, with their defaults
DEMO_RUN_DEFAULTS = {"seeds": 3, "seed": 0, "label_noise": 0.0, "teacher_map": False, "pair": None}


def _args_demo_run(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    _add_demo_args(parser, "runs/demo", defaults)
    parser.add_argument("--seed", type=int, **_default(DEMO_RUN_DEFAULTS["seed"], defaults), help="first seed")
    parser.add_argument("--label-noise", type=float, **_default(DEMO_RUN_DEFAULTS["label_noise"], defaults),
                        metavar="SHARE",
                        help="make this share of the distillation answers wrong the way a weaker "
                             "annotator is (a missed list item, a count off by one); evaluation "
                             "stays clean (docs/demo.md)")
    parser.add_argument("--teacher-map", action="store_true",
                        help="also distil from the weaker teacher snapshots: VLsI minus SFT-only "
                             "against the teacher-student gap")
    parser.add_argument("--teacher-from", help=argparse.SUPPRESS)  # a `vlsi demo pretrain` option: refused


def _args_demo_pretrain(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    parser.add_argument("--out", **_default("runs/demo", defaults), help="output directory (a rerun resumes it)")
    parser.add_argument("--quick", action="store_true", help="a fraction of the budget (plumbing check)")
    _add_regime_arg(parser, defaults)
    parser.add_argument("--teacher-from", metavar="PAIR",
                        help="reuse this pair's teacher (a directory, or `shipped`) and train only the student")


def _args_demo(parser: argparse.ArgumentParser) -> None:
    """``vlsi demo [options]`` runs the demo; ``vlsi demo pretrain`` is a command of its own."""
    _args_demo_run(parser)
    commands = parser.add_subparsers(dest="demo_command", metavar="{run,pretrain,regime}")
    # options left out after the sub-command keep what was written before it (no default overrides it)
    run = commands.add_parser("run", help="the demo (the default: `vlsi demo [options]` runs it)",
                              argument_default=argparse.SUPPRESS)
    _args_demo_run(run, defaults=False)
    pretrain = commands.add_parser("pretrain", help="train the teacher/student pair from scratch",
                                   description="Rebuild the demo's pretrained pair into --out.",
                                   argument_default=argparse.SUPPRESS)
    _args_demo_pretrain(pretrain, defaults=False)
    pretrain.set_defaults(func=_cmd_demo_pretrain)
    regime = commands.add_parser("regime", help="what a run's distillation targets hold beyond the labels (JSON)",
                                 description="The regime numbers of docs/demo.md for a run config and its "
                                             "teacher verbalizers.")
    regime.add_argument("config", help="a run config (e.g. a demo seed's vlsi.yaml)")
    regime.add_argument("teacher_verbalizers", help="the teacher's verbalizer directory")
    regime.add_argument("--samples", type=positive_int, default=512, help="distillation samples measured (default 512)")
    regime.set_defaults(func=_cmd_demo_regime)


def _args_ablate(parser: argparse.ArgumentParser) -> None:
    _add_demo_args(parser, "runs/ablate")
    parser.add_argument("--only", nargs="+", choices=["b", "d", "e", "f", "g"], help="sub-tables to run "
                                                                                "(default: all)")


def _args_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="a checkpoint (e.g. an exported student)")
    parser.add_argument("--image", action="append", metavar="IMG", help="an image (repeatable)")
    parser.add_argument("--prompt", required=True, help="the question; <image> tags place the images")
    parser.add_argument("--num-beams", type=positive_int, default=1)
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--device", help=DEVICE_HELP)


def _args_verbalize_layers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR")
    parser.add_argument("--verbalizers", required=True, metavar="DIR",
                        help="the model's verbalizers (an exported model's DIR/verbalizers)")
    parser.add_argument("--image", metavar="IMG")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--compare", nargs=2, action="append", metavar=("MODEL", "VERBALIZERS"),
                        help="another model and its verbalizers, shown beside (repeatable)")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="also writes FILE.md")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32)
    parser.add_argument("--device", help=DEVICE_HELP)


def _args_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR")
    parser.add_argument("--data", required=True, metavar="FILE", help="project JSON/JSONL or MMBench-style .tsv")
    parser.add_argument("--image-root", metavar="DIR", help="JSON image paths are relative to this "
                                                           "(default: the file's directory)")
    parser.add_argument("--out", metavar="FILE.jsonl", help="predictions (default: "
                                                           "runs/eval/MODEL-DATA.predictions.jsonl)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=positive_int, default=16)
    parser.add_argument("--limit", type=positive_int, help="evaluate the first N questions only")
    parser.add_argument("--device", help=DEVICE_HELP)


def _args_verbalize(parser: argparse.ArgumentParser) -> None:
    _add_run_args(parser)
    parser.add_argument("--role", required=True, choices=["teacher", "student"])


def _args_interact(parser: argparse.ArgumentParser) -> None:
    _add_run_args(parser)
    parser.add_argument("--teacher-verbalizers", metavar="DIR", help="default: OUTPUT_DIR/1-teacher-verbalize")
    parser.add_argument("--student-verbalizers", metavar="DIR", help="default: OUTPUT_DIR/2-student-verbalize")
    parser.add_argument("--teacher-cache", metavar="DIR",
                        help="read the teacher's top-K from a `vlsi cache-teacher` directory; no teacher is loaded")


def _args_cache_teacher(parser: argparse.ArgumentParser) -> None:
    _add_run_args(parser, out=False, restart=False)
    parser.add_argument("--out", metavar="DIR", help="the cache directory (default: interaction.teacher_cache, "
                                                     "else OUTPUT_DIR/teacher-cache); a rerun continues it")
    parser.add_argument("--teacher-verbalizers", metavar="DIR", help="default: OUTPUT_DIR/1-teacher-verbalize")
    parser.add_argument("--top-k", type=positive_int, metavar="K",
                        help="log-probabilities kept per layer and token (default interaction.teacher_cache_top_k)")
    parser.add_argument("--storage", choices=["float16", "float32"], default="float16",
                        help="dtype of the stored log-probabilities (default float16)")
    from vlsi.train.stages.cache_teacher import SAMPLES_PER_SHARD

    parser.add_argument("--samples-per-shard", type=positive_int, default=SAMPLES_PER_SHARD, metavar="N",
                        help=f"samples per shard file (default {SAMPLES_PER_SHARD})")


def _args_sft(parser: argparse.ArgumentParser) -> None:
    _add_run_args(parser)
    parser.add_argument("--adapter", metavar="DIR",
                        help="LoRA adapter to continue (default: OUTPUT_DIR/3-interact/adapter if it "
                             "exists, else a fresh LoRA)")
    parser.add_argument("--student-verbalizers", metavar="DIR",
                        help="verbalizers exported beside the model (default: "
                             "OUTPUT_DIR/2-student-verbalize if it exists)")


def _args_config(parser: argparse.ArgumentParser) -> None:
    _add_run_args(parser, out=False, restart=False)


def _args_plan(parser: argparse.ArgumentParser) -> None:
    _add_run_args(parser, out=False, restart=False)
    parser.add_argument("--gpus", type=positive_int, default=8, help="GPUs (processes) of the launch (default 8)")
    parser.add_argument("--gpu-memory", default="80GB", metavar="SIZE", help="memory of one GPU, e.g. 80GB, 141GB")
    parser.add_argument("--engine", choices=["ddp", "zero2", "zero3", "fsdp"], default="zero3",
                        help="how weights and optimizer states are spread (default zero3)")
    parser.add_argument("--teacher-shape", metavar="NAME", help="plan a published shape instead of the teacher "
                        "checkpoint's config.json: qwen2-vl-2b, qwen2-vl-7b, qwen2-vl-72b")
    parser.add_argument("--student-shape", metavar="NAME", help="the same for the student")
    parser.add_argument("--response-tokens", type=positive_int, metavar="N",
                        help="supervised tokens per sample (default: data.max_length, the worst case)")


def _args_distill(parser: argparse.ArgumentParser) -> None:
    _add_run_args(parser, out=False)
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue unfinished steps from their newest checkpoint (default); "
                             "--no-resume restarts them from scratch. Finished steps never rerun.")


class Command(NamedTuple):
    """A ``vlsi`` command: its name and help, the function adding its arguments, its handler
    (``None``: a group whose sub-commands set their own)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], Any] | None
    description: str | None = None


COMMANDS = (
    Command("tiny", "build an offline tiny teacher/student pair", _args_tiny, _cmd_tiny),
    Command("data", "dataset tools", _args_data, None),
    Command("bench", "benchmarks", _args_bench, None),
    Command("demo", "the method's claim on the embedded default; writes a report", _args_demo, _cmd_demo,
            "`vlsi demo`: distil the shipped pretrained pair three ways and report; "
            "`vlsi demo pretrain --out DIR`: rebuild the pair."),
    Command("ablate", "the paper's Table 4 (b, d, e, f) at tiny scale on the demo's pair, "
                      "and (g) on-policy interaction with three divergences", _args_ablate, _cmd_ablate),
    Command("generate", "answer a prompt (greedy; --num-beams for beam search)", _args_generate, _cmd_generate),
    Command("verbalize-layers", "each target layer's verbalized response, side by side (HTML + Markdown)",
            _args_verbalize_layers, _cmd_verbalize_layers),
    Command("eval", "multiple-choice / short-answer accuracy on a dataset", _args_eval, _cmd_eval),
    Command("verbalize", "step 1: train one backbone's verbalizers", _args_verbalize, _cmd_verbalize),
    Command("interact", "step 2: layer-matched interaction (LoRA on the student)", _args_interact, _cmd_interact),
    Command("cache-teacher", "run the teacher and its verbalizers over the data once; "
                             "store their top-K for `interact --teacher-cache`", _args_cache_teacher,
            _cmd_cache_teacher),
    Command("sft", "step 3: next-token SFT of the student, then export", _args_sft, _cmd_sft),
    Command("config", "print the resolved config, every key with its help", _args_config, _cmd_config),
    Command("plan", "per-GPU memory of every step, from the model configs, before any loading", _args_plan,
            _cmd_plan),
    Command("distill", "the whole pipeline: both verbalizations, interaction, SFT", _args_distill, _cmd_distill),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``vlsi`` parser: one sub-command per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="vlsi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"vlsi {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.description)
        command.arguments(sub)
        if command.handler is not None:
            sub.set_defaults(func=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse printed its usage line (bad value) or the help
        return int(stop.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.func(args)
    except VlsiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Destroy the process group a launched command joined, so that no communication thread is
    left running when the interpreter exits (a local call: no other process is waited for)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
