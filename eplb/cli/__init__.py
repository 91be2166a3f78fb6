"""The ``eplb`` command (also ``python -m eplb``).

- ``eplb demo``: plan the embedded DeepSeek-V3-shaped load with each policy on
  each installed backend, print time and balance; write the placement only
  with ``--out`` and a plot only with ``--plot``.
- ``eplb plan --load FILE --gpus G ...``: plan a load file, print before/after
  balance, write the placement (``--out``) and a plot (``--plot``).
- ``eplb inspect PLACEMENT --load FILE``: balance of an existing placement.

A bad file or config prints one line, ``eplb: error: ...``, and exits with 2.
"""

from __future__ import annotations

import argparse
import sys

import eplb
from eplb.cli import _commands, _files
from eplb.cli._common import BACKENDS, BALANCE_POLICIES, UsageError
from eplb.cli._console import Console

__all__ = ["main"]

EXAMPLES = """examples:
  eplb demo --plot demo.png
  eplb plan --load loads.npz --gpus 32 --replicas 288 --groups 8 --nodes 4 --out placement.json --plot plan.png
  eplb plan --load history.npy --window 100 --gpus 8 --replicas 144 --policy refined --backend jax
  eplb inspect placement.json --load loads.npz

'eplb COMMAND --help' tells more."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _load_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    suffixes = "/".join(_files.LOAD_SUFFIXES)
    shapes = "[layers, experts] or a history [steps, layers, experts]"
    parser.add_argument("--load", required=required, metavar="FILE", help=f"expert loads ({suffixes}): {shapes}")
    parser.add_argument("--key", help="array to read from a file that holds several (npz/json/pt)")
    parser.add_argument(
        "--window", type=_positive, metavar="N", help="sum the last N steps of a history (default: all)"
    )


def _config_flags(parser: argparse.ArgumentParser, gpus_required: bool) -> None:
    group = parser.add_argument_group("deployment (the arguments of rebalance_experts)")
    group.add_argument("--gpus", type=_positive, required=gpus_required, metavar="G", help="GPUs (num_gpus)")
    slots = "physical expert slots per layer (num_replicas; default: one per expert)"
    group.add_argument("--replicas", type=_positive, metavar="R", help=slots)
    group.add_argument("--groups", type=_positive, metavar="N", help="expert groups (num_groups; default 1)")
    group.add_argument("--nodes", type=_positive, metavar="N", help="nodes (num_nodes; default 1)")
    group.add_argument(
        "--hierarchical",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force the hierarchical or the global policy (default: hierarchical iff groups %% nodes == 0)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="eplb",
        description="Expert-parallel load balancing for MoE models.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"eplb {eplb.__version__}")
    parser.add_argument("--plain", action="store_true", help="plain text output, no colours or progress bar")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser("demo", help="plan an embedded DeepSeek-V3-shaped load on every installed backend")
    demo.add_argument("--out", metavar="FILE", help="write the refined placement: .json or .npz")
    demo.add_argument("--plot", metavar="FILE.png", help="draw per-GPU loads and a layer x GPU heat map")
    demo.set_defaults(func=_commands.demo)

    plan = commands.add_parser("plan", help="plan a placement for a load file")
    _load_flags(plan, required=True)
    _config_flags(plan, gpus_required=True)
    plan.add_argument("--policy", choices=BALANCE_POLICIES, default="greedy", help="default: %(default)s")
    plan.add_argument("--backend", choices=BACKENDS, default="numpy", help="default: %(default)s")
    plan.add_argument("--previous", metavar="FILE", help="the current placement (.json/.npz/.npy), to move few experts")
    plan.add_argument(
        "--spill", type=int, default=0, metavar="S", help="replicas per node that may serve other nodes' groups"
    )
    plan.add_argument(
        "--balance-tolerance",
        type=float,
        metavar="T",
        help="with --previous: move fewer experts, heaviest GPU within (1 + T) of a fresh plan",
    )
    plan.add_argument("--max-moves", type=int, metavar="K", help="with --previous: at most K moved experts per layer")
    plan.add_argument("--out", metavar="FILE", help="write the placement: .json or .npz")
    plan.add_argument("--plot", metavar="FILE.png", help="draw per-GPU loads before/after and layer x GPU heat maps")
    plan.add_argument("--layer", type=int, help="layer of the bar chart (default: the worst-balanced one)")
    plan.set_defaults(func=_commands.plan)

    check = commands.add_parser("inspect", help="measure an existing placement against a load")
    check.add_argument("placement", help="placement file (.json/.npz from eplb, or a phy2log .npy)")
    _load_flags(check, required=True)
    _config_flags(check, gpus_required=False)
    check.add_argument("--plot", metavar="FILE.png", help="draw per-GPU loads and a layer x GPU heat map")
    check.add_argument("--layer", type=int, help="layer of the bar chart (default: the worst-balanced one)")
    check.set_defaults(func=_commands.inspect_placement)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``eplb`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments after the program name.

    Returns
    -------
    int
        0 on success, 2 for a bad command line, file or config (one line on stderr).
    """
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a usage error already printed
        return stop.code if isinstance(stop.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    console = Console(plain=args.plain)
    try:
        return args.func(args, console)
    except (UsageError, _files.FileError) as err:
        print(f"eplb: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eplb: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
