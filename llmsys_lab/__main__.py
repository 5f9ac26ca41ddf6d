"""Command line: `python -m llmsys_lab doctor | estimate | grade`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmsys_lab", description="llmsys-lab tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check versions, device and Triton mode; list fixes")
    est = sub.add_parser("estimate", help="parameters, FLOPs, memory and roofline of a model preset")
    est.add_argument("model", help="preset name, e.g. llama-2-7b (see --list)")
    est.add_argument("--batch", type=int, default=1)
    est.add_argument("--seq", type=int, default=4096)
    est.add_argument("--dtype", default="bf16")
    est.add_argument("--gpu", default="A100-80GB")
    est.add_argument("--causal", action="store_true", help="count only the causal half of attention")
    est.add_argument("--json", action="store_true", help="print JSON instead of tables")
    gr = sub.add_parser("grade", help="autograde assignment notebooks (no nbgrader database needed)")
    gr.add_argument("submissions", nargs="+", metavar="SUBMISSION.ipynb")
    gr.add_argument("--source", default="auto", help="instructor notebook, or a folder to search for it, whose "
                    "test cells (hidden tests included) are restored before grading (default: the kit's solutions/)")
    gr.add_argument("--no-source", action="store_true", help="student self-check: grade with the submission's own "
                    "visible test cells only (not an official grade)")
    gr.add_argument("--timeout", type=float, default=120, help="seconds per cell before it is interrupted (default 120)")
    gr.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time (default 1)")
    gr.add_argument("--kernel", default="python3", help="Jupyter kernel to run the notebooks (default python3)")
    gr.add_argument("--json", metavar="FILE", help="also write the results as JSON (- for stdout)")
    gr.add_argument("--csv", metavar="FILE", help="also write one row per test as CSV (- for stdout)")
    args = parser.parse_args(argv)
    if args.command == "grade":
        from .grading import main_grade

        return main_grade(args)
    if args.command == "estimate":
        return _estimate(args)
    if args.command == "doctor":
        from .doctor import doctor

        return 0 if doctor().ok else 1
    return 2


def _estimate(args) -> int:
    import json

    from .estimators.report import estimate, format_report
    from .presets import get_preset
    from .validate import ConfigError

    try:
        cfg = get_preset(args.model)
        if args.json:
            print(json.dumps(estimate(cfg, args.batch, args.seq, args.dtype, args.gpu, args.causal), indent=1))
        else:
            print(format_report(cfg, args.batch, args.seq, args.dtype, args.gpu, args.causal))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
