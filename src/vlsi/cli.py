"""The ``vlsi`` command line: sub-commands mapped to functions of the package.

    vlsi tiny OUT_DIR [--family qwen2_vl]     build an offline tiny teacher/student pair
    vlsi data synth OUT_DIR [--seed 0 ...]    write the synthetic visual-instruction dataset
    vlsi data check FILE --model DIR          validate a dataset, print counts and skips
    vlsi bench loss [...]                     chunked vs naive interaction-loss benchmark
    vlsi demo                                 the smallest end-to-end run (see ``vlsi.demo``)

User errors (:class:`vlsi.errors.VlsiError`) print one line, ``error: ...``, and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from vlsi import __version__
from vlsi.errors import VlsiError


def _offline() -> None:
    """Models load from local paths only: never let a typo turn into a hub download."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _cmd_tiny(args: argparse.Namespace) -> None:
    from vlsi.tiny import save_tiny_pair

    pair = save_tiny_pair(args.out_dir, args.family, seed=args.seed)
    print(f"teacher: {pair.teacher}\nstudent: {pair.student}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from vlsi.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlsi", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"vlsi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("tiny", help="build an offline tiny teacher/student pair")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", default="qwen2_vl",
                      choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_cmd_tiny)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    from vlsi.data import check, synthetic

    synthetic.add_cli(data_sub)
    check.add_cli(data_sub)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    from vlsi import bench as bench_mod

    bench_mod.add_cli(bench_sub)

    demo = sub.add_parser("demo", help="the smallest end-to-end run on the embedded default")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    _offline()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except VlsiError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
