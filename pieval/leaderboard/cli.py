"""`pieval leaderboard RESULTS_DIR... [--out leaderboards/] [--plots]`."""

from __future__ import annotations

import argparse
import sys

from pieval.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", metavar="RESULTS_DIR", help="lm_eval --output_path directories (or results_*.json files)")
    parser.add_argument("--out", default="leaderboards", help="directory for the CSV tables (default: leaderboards/)")
    parser.add_argument("--plots", action="store_true", help="also draw the plots (PNG + SVG) into OUT/plots/")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="leave out the paper's reference rows")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any input was skipped (default: report it and go on)")


def run(args: argparse.Namespace) -> int:
    from pieval.leaderboard import build

    board = build.build(args.results, with_reference=args.reference)
    skipped = [p for p in board.problems if p.skipped]
    for problem in board.problems:
        print(f"pieval leaderboard: {'skipped' if problem.skipped else 'note'}: {problem}", file=sys.stderr)
    if not board.measured_rows():
        raise UserError(
            f"no measured row could be built from {', '.join(args.results)} "
            f"({len(skipped)} input(s) skipped, see above); nothing written to {args.out}"
        )
    for path in build.write(board, args.out):
        print(path)
    if args.plots:
        from pieval.leaderboard import plots

        for path in plots.draw(board, f"{args.out}/plots"):
            print(path)
    return 1 if args.strict and skipped else 0
