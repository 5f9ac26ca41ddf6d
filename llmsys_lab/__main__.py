"""Command line: `python -m llmsys_lab doctor | estimate | grade | serve`."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmsys_lab", description="llmsys-lab tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="check versions, device and Triton mode; list fixes")
    est = sub.add_parser("estimate", help="parameters, FLOPs, memory and roofline of a model preset")
    est.add_argument("model", nargs="?", help="preset name, e.g. llama-2-7b or mixtral-8x7b (see --list)")
    est.add_argument("--list", action="store_true", help="list the model presets and GPUs, then exit")
    est.add_argument("--batch", type=int, default=1)
    est.add_argument("--seq", type=int, default=4096)
    est.add_argument("--dtype", default="bf16")
    est.add_argument("--gpu", default="A100-80GB")
    est.add_argument("--causal", action="store_true", help="count only the causal half of attention")
    est.add_argument("--precision", default=None, help="training precision: fp32, mixed (bf16 autocast; the "
                     "default), mixed-zero (dense presets only)")
    est.add_argument("--json", action="store_true", help="print JSON instead of tables")
    from .parallel.estimate import add_arguments as add_parallel_arguments
    add_parallel_arguments(est)          # --tp --pp --dp --zero --micro-batches
    gr = sub.add_parser("grade", help="autograde assignment notebooks (no nbgrader database needed)")
    gr.add_argument("submissions", nargs="+", metavar="SUBMISSION.ipynb")
    gr.add_argument("--source", default="auto", help="instructor notebook, or a folder to search for it, whose "
                    "test cells (hidden tests included) are restored before grading (default: the kit's solutions/)")
    gr.add_argument("--no-source", action="store_true", help="student self-check: grade with the submission's own "
                    "visible test cells only (not an official grade)")
    gr.add_argument("--timeout", type=float, default=120, help="seconds per cell before it is interrupted (default 120)")
    gr.add_argument("--jobs", type=int, default=1, help="submissions graded at the same time (default 1)")
    gr.add_argument("--unsafe", action="store_true", help="where the sandbox (bubblewrap) cannot run, grade "
                    "without it; every result is labelled UNSAFE and is not an official grade")
    gr.add_argument("--kernel", default="python3", help="Jupyter kernel to run the notebooks (default python3)")
    gr.add_argument("--json", metavar="FILE", help="also write the results as JSON (- for stdout)")
    gr.add_argument("--csv", metavar="FILE", help="also write one row per test as CSV (- for stdout)")
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server around the kit's engine")
    from .server import add_arguments as add_server_arguments
    add_server_arguments(sv)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from .server import main as serve_main

        return serve_main(args)
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

    from .estimators.moe import MoEModelConfig
    from .estimators.report import estimate, format_listing, format_report
    from .presets import resolve_preset
    from .parallel.estimate import ParallelPlan, estimate_parallel, report_from_args
    from .validate import ConfigError

    if args.list:
        print(format_listing())
        return 0
    if args.model is None:
        print("error: name a model preset (python -m llmsys_lab estimate --list shows them)", file=sys.stderr)
        return 2
    try:
        cfg = resolve_preset(args.model)
        plan = ParallelPlan(args.tp, args.pp, args.dp, args.zero, args.micro_batches)
        parallel = not (plan.devices == 1 and plan.zero == 0 and plan.micro_batches == 1)
        if isinstance(cfg, MoEModelConfig):
            return _estimate_moe(cfg, args, parallel)
        kw = dict(causal=args.causal, precision=args.precision or "mixed")
        if args.json:
            result = estimate(cfg, args.batch, args.seq, args.dtype, args.gpu, **kw)
            if parallel:
                result["parallel"] = estimate_parallel(cfg, args.batch, args.seq, plan,
                                                       args.precision or "mixed-zero").as_dict()
            print(json.dumps(result, indent=1))
        else:
            print(format_report(cfg, args.batch, args.seq, args.dtype, args.gpu, **kw))
            table = report_from_args(cfg, args)
            if table:
                print("\n" + table)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _estimate_moe(cfg, args, parallel: bool) -> int:
    """An MoE preset: parameters (total and active), FLOPs, weight and KV memory, dense vs MoE. What the
    dense report has and this one does not (training memory, parallel plans) is refused, not ignored."""
    import json

    from .estimators.report import estimate_moe, format_moe_report
    from .validate import ConfigError

    if parallel:
        raise ConfigError(f"{cfg.name} is an MoE preset: parallel plans (--tp/--pp/--dp/--zero/--micro-batches) are "
                          "estimated for dense presets only (expert parallelism: llmsys_lab.parallel.expert_parallel, "
                          "lesson 09)")
    if args.precision is not None:
        raise ConfigError(f"{cfg.name} is an MoE preset: training memory is estimated for dense presets only, so "
                          f"--precision {args.precision} has nothing to change")
    if args.json:
        print(json.dumps(estimate_moe(cfg, args.batch, args.seq, args.dtype, args.gpu, args.causal), indent=1))
    else:
        print(format_moe_report(cfg, args.batch, args.seq, args.dtype, args.gpu, args.causal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
