"""Online serving under load: request rate vs latency, throughput and goodput, measured at the client.

The way serving systems are measured (vLLM's and SGLang's serving benchmarks): an OpenAI-compatible
server runs in its own process; a load generator sends streaming ``/v1/completions`` requests with the
official ``openai`` client at a target rate, arrivals drawn from a Poisson process (exponential gaps)
or a bursty gamma process (the same mean rate, coefficient of variation 2: shape 1/4), and records per
request, at the client:

* TTFT: send to the first streamed text; TPOT: (last text - first text) / (output tokens - 1), the
  output counted by re-tokenising the text (so every server is counted alike); E2E: send to the end.
* throughput (output tokens/s and requests/s over the run) and **goodput**: requests/s that met both
  SLOs (TTFT <= --slo-ttft and TPOT <= --slo-tpot). Past the knee throughput keeps rising while goodput
  falls: requests queue, TTFT grows, and more of them miss the SLO.

Prompts are slices of the bundled Shakespeare validation tokens (real text, offline), lengths and
max_tokens from a seeded uniform distribution; the same workload (seed) at every rate and for every
server. Servers: the kit (``python -m llmsys_lab serve``), transformers' ``transformers serve`` (where
it starts offline: otherwise the run prints why it was skipped), and, as the ceiling, the kit's offline
engine with every request queued at once.

    python benchmarks/online_serving.py                 # CPU-sized defaults; saves JSON + PNG in benchmarks/results/
    python benchmarks/online_serving.py --rates 2 4 8 16 32 --requests 200 --slo-ttft 0.2 --slo-tpot 0.02   # a GPU
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmsys_lab.benchmarking import save_results  # noqa: E402
from llmsys_lab.metrics import percentile  # noqa: E402


# ---- the workload ----------------------------------------------------------------------------------
def workload(n: int, seed: int, prompt_len=(16, 128), output_len=(16, 64)):
    """n (prompt text, max_tokens): prompts are slices of real text (Shakespeare's validation plays)."""
    from llmsys_lab.model import TINY_MODEL_PATH
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
    val = np.load(TINY_MODEL_PATH.parent / "shakespeare-tokens" / "tokens.npz")["val"].astype(np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(prompt_len[0], prompt_len[1] + 1))
        start = int(rng.integers(0, len(val) - length))
        out.append((tok.decode(val[start:start + length].tolist()), int(rng.integers(output_len[0], output_len[1] + 1))))
    return out, tok


def arrivals(n: int, rate: float, kind: str, seed: int) -> np.ndarray:
    """Send times (seconds from the start) of n requests at mean `rate` per second."""
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        gaps = rng.exponential(1 / rate, n)
    elif kind == "gamma":                               # bursty: CV = 2 (shape 1/4), same mean rate
        gaps = rng.gamma(0.25, 4 / rate, n)
    else:
        raise ValueError(f"arrival must be 'poisson' or 'gamma', got {kind!r}")
    return np.cumsum(gaps) - gaps[0]


# ---- one run: a rate against a server --------------------------------------------------------------
async def _one(client, model, prompt, max_tokens, delay, began, tok):
    import openai

    await asyncio.sleep(max(0.0, began + delay - time.perf_counter()))
    sent = time.perf_counter()
    times, text = [], []
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 temperature=0.0)
        async for c in stream:
            if c.choices and c.choices[0].text:
                times.append(time.perf_counter())
                text.append(c.choices[0].text)
    except openai.APIError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:200], "sent": sent}
    end = time.perf_counter()
    n = len(tok("".join(text), add_special_tokens=False).input_ids) if text else 0
    if not times:              # ended at once (EOS first): answered, with no text; its first token is its end
        return {"ok": True, "sent": sent, "end": end, "ttft": end - sent, "tpot": 0.0, "e2e": end - sent, "tokens": 0}
    ttft = times[0] - sent
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else 0.0
    return {"ok": True, "sent": sent, "end": end, "ttft": ttft, "tpot": tpot, "e2e": end - sent, "tokens": n}


def run_rate(url, model, work, tok, rate, kind, seed, slo_ttft, slo_tpot) -> dict:
    import openai

    sends = arrivals(len(work), rate, kind, seed)

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
            began = time.perf_counter()
            return await asyncio.gather(*(_one(client, model, p, m, d, began, tok) for (p, m), d in zip(work, sends)))

    res = asyncio.run(main())
    ok = [r for r in res if r["ok"]]
    duration = max(r["end"] for r in ok) - min(r["sent"] for r in res) if ok else float("nan")
    good = [r for r in ok if r["ttft"] <= slo_ttft and r["tpot"] <= slo_tpot]
    row = {"rate": rate, "arrival": kind, "requests": len(res), "completed": len(ok), "failed": len(res) - len(ok),
           "duration_s": duration, "throughput_tok_s": sum(r["tokens"] for r in ok) / duration,
           "throughput_req_s": len(ok) / duration, "goodput_req_s": len(good) / duration,
           "slo_attainment": len(good) / len(res)}
    for key in ("ttft", "tpot", "e2e"):
        vals = [r[key] for r in ok]
        row[key] = {f"p{p}": percentile(vals, p) for p in (50, 90, 99)}
    errors = sorted({r["error"] for r in res if not r["ok"]})
    if errors:
        row["errors"] = errors[:3]
    return row


# ---- servers in their own processes ------------------------------------------------------------------
def wait_up(url: str, proc, timeout: float) -> str | None:
    """None when GET /health answers 200 within `timeout`, else why not."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the process exited with code {proc.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return f"no answer on {url}/health within {timeout:.0f} s"


def start(cmd: list[str], url: str, timeout: float, env=None):
    """Start a server process; (process, None) once it answers, else (process, why not: its last log line)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="llmsys-online-")) / "server.log"
    with open(path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    why = wait_up(url, proc, timeout)
    if why is not None:
        stop(proc)
        last = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        why += f": {last[-1].strip()}" if last else ""
    return proc, why


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    from llmsys_lab.server import free_port as fp

    return fp()


def offline_ceiling(work, tok, args) -> dict:
    """The kit's engine with every request queued at once (no HTTP): the throughput ceiling."""
    import torch

    from llmsys_lab.engine import serve
    from llmsys_lab.model import load_tiny

    torch.set_num_threads(args.threads)
    model, _ = load_tiny()
    prompts = [tok(p).input_ids for p, _ in work]
    began = time.perf_counter()
    engine, done = serve(model, prompts, [m for _, m in work], num_blocks=args.num_blocks, block_size=16,
                         max_batch=args.max_batch, token_budget=args.token_budget, eos_token_id=tok.eos_token_id)
    seconds = time.perf_counter() - began
    tokens = sum(len(r.output) for r in done.values())
    return {"requests": len(done), "seconds": seconds, "throughput_tok_s": tokens / seconds,
            "throughput_req_s": len(done) / seconds}


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, runs in results.items():
        for kind, rows in runs.items():
            rates = [r["rate"] for r in rows]
            style = "-" if kind == "poisson" else "--"
            label = f"{name}, {kind}"
            axes[0].plot(rates, [r["ttft"]["p90"] for r in rows], style, marker="o", label=f"{label}: p90")
            axes[0].plot(rates, [r["ttft"]["p50"] for r in rows], style, marker=".", alpha=0.5, label=f"{label}: p50")
            axes[1].plot(rates, [r["tpot"]["p90"] for r in rows], style, marker="o", label=f"{label}: p90")
            axes[2].plot(rates, [r["goodput_req_s"] for r in rows], style, marker="o", label=f"{label}: goodput")
            axes[2].plot(rates, [r["throughput_req_s"] for r in rows], style, marker="x", alpha=0.5,
                         label=f"{label}: throughput")
    axes[0].axhline(args.slo_ttft, color="red", lw=1, label=f"SLO {args.slo_ttft} s")
    axes[1].axhline(args.slo_tpot, color="red", lw=1, label=f"SLO {args.slo_tpot} s")
    lim = max(args.rates)
    axes[2].plot([0, lim], [0, lim], color="grey", lw=0.8, ls=":", label="offered rate")
    for ax, title, unit in zip(axes, ("TTFT", "TPOT", "goodput and throughput"), ("s", "s", "requests/s")):
        ax.set_title(title)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.suptitle(f"online serving, {args.requests} requests per rate, SLO: TTFT <= {args.slo_ttft} s, "
                 f"TPOT <= {args.slo_tpot} s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def table(name: str, rows: list[dict]) -> str:
    lines = [f"{name}",
             f"{'arrival':<8}{'rate':>6}{'done':>6}{'tok/s':>8}{'req/s':>7}{'goodput':>9}{'SLO met':>8}"
             f"{'TTFT p50':>10}{'p90':>8}{'p99':>8}{'TPOT p50':>10}{'p90':>8}{'E2E p90':>9}"]
    for r in rows:
        lines.append(f"{r['arrival']:<8}{r['rate']:>6g}{r['completed']:>6}{r['throughput_tok_s']:>8.1f}"
                     f"{r['throughput_req_s']:>7.2f}{r['goodput_req_s']:>9.2f}{r['slo_attainment']:>8.0%}"
                     f"{r['ttft']['p50']:>10.3f}{r['ttft']['p90']:>8.3f}{r['ttft']['p99']:>8.3f}"
                     f"{r['tpot']['p50']:>10.4f}{r['tpot']['p90']:>8.4f}{r['e2e']['p90']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[2, 4, 8, 16, 32, 64])
    p.add_argument("--arrivals", nargs="+", default=["poisson", "gamma"], choices=["poisson", "gamma"])
    p.add_argument("--requests", type=int, default=40, help="requests per rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=0.25, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.05, help="seconds")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=256)
    p.add_argument("--token-budget", type=int, default=1024)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (CPU)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers serve")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "online_serving.json")
    args = p.parse_args(argv)

    from llmsys_lab.model import TINY_MODEL_PATH

    work, tok = workload(args.requests, args.seed)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    results, skipped = {}, {}
    servers = {"llmsys-lab": lambda port: [sys.executable, "-m", "llmsys_lab", "serve", "--port", str(port),
                                           "--max-batch", str(args.max_batch), "--num-blocks", str(args.num_blocks),
                                           "--token-budget", str(args.token_budget),
                                           "--max-queue", str(args.max_queue)]}
    models = {"llmsys-lab": "llmsys-tiny", "transformers serve": str(TINY_MODEL_PATH)}
    if not args.no_hf:
        exe = Path(sys.executable).parent / "transformers"
        servers["transformers serve"] = lambda port: [str(exe), "serve", str(TINY_MODEL_PATH), "--port", str(port),
                                                      "--continuous-batching"]
    for name, cmd in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc, why = start(cmd(port), url, timeout=120, env=env)
        if why is not None:
            skipped[name] = why
            print(f"{name}: skipped: it did not start offline ({why})")
            continue
        try:
            run_rate(url, models[name], work[:4], tok, 4.0, "poisson", args.seed, args.slo_ttft, args.slo_tpot)  # warm-up
            results[name] = {}
            for kind in args.arrivals:
                rows = []
                for rate in args.rates:
                    rows.append(run_rate(url, models[name], work, tok, rate, kind, args.seed, args.slo_ttft,
                                         args.slo_tpot))
                    if rows[-1]["completed"] == 0:
                        skipped[name] = f"no request completed at rate {rate}: {rows[-1].get('errors')}"
                        break
                results[name][kind] = rows
                print(table(f"{name} ({kind} arrivals)", rows), flush=True)
        finally:
            stop(proc)
    offline = offline_ceiling(work, tok, args)
    print(f"offline engine (all {offline['requests']} requests at once): {offline['throughput_tok_s']:.1f} tok/s, "
          f"{offline['throughput_req_s']:.2f} req/s")
    knee = {}
    for name, runs in results.items():
        for kind, rows in runs.items():
            best = max(rows, key=lambda r: r["goodput_req_s"])
            knee[f"{name} ({kind})"] = {"rate": best["rate"], "goodput_req_s": best["goodput_req_s"]}
            print(f"knee, {name} ({kind}): goodput {best['goodput_req_s']:.2f} req/s at {best['rate']:g} req/s")
    payload = {"model": "llmsys-tiny (bundled, fp32)", "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": results, "offline_engine": offline, "knee": knee, "skipped": skipped}
    import torch

    save_results(args.out, payload, server_device="cuda" if torch.cuda.is_available() else "cpu",
                 cpu_threads=args.threads, cpu_count=os.cpu_count())
    plot(results, args, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
