"""Command line: `python -m llmsys_lab doctor`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmsys_lab", description="llmsys-lab tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check versions, device and Triton mode; list fixes")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from .doctor import doctor

        return 0 if doctor().ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
