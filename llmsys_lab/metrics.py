"""Serving metrics from finished requests (lectures 002 and 004).

TTFT: arrival to first token. TPOT: mean time between later tokens. End-to-end latency: arrival to
last token. Throughput: output tokens per second of the run. Goodput: requests per second that met
the latency SLO (TTFT and TPOT limits); a fast system that misses the SLO has high throughput and
low goodput.
"""
from __future__ import annotations

import statistics

from .scheduler import Request


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def request_metrics(r: Request, start: float = 0.0) -> dict:
    ttft = r.first_token_at - start
    gaps = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
    return {"ttft": ttft, "tpot": statistics.fmean(gaps) if gaps else 0.0, "e2e": r.finished_at - start,
            "tokens": len(r.output)}


def summarize(requests: list[Request], duration: float, slo_ttft: float | None = None,
              slo_tpot: float | None = None) -> dict:
    per = [request_metrics(r) for r in requests]
    out = {"requests": len(per), "output_tokens": sum(m["tokens"] for m in per), "duration": duration,
           "throughput": sum(m["tokens"] for m in per) / duration if duration else 0.0}
    for key in ("ttft", "tpot", "e2e"):
        vals = [m[key] for m in per]
        out[key] = {f"p{p}": percentile(vals, p) for p in (50, 90, 99)}
    if slo_ttft is not None or slo_tpot is not None:
        good = [m for m in per if (slo_ttft is None or m["ttft"] <= slo_ttft) and (slo_tpot is None or m["tpot"] <= slo_tpot)]
        out["goodput"] = len(good) / duration if duration else 0.0
        out["slo_attainment"] = len(good) / len(per) if per else 0.0
    return out
