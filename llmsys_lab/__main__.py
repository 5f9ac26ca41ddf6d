"""Command line: `python -m llmsys_lab doctor`."""
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
    args = parser.parse_args(argv)
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
