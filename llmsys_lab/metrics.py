"""Serving metrics from finished requests (lectures 002 and 004).

TTFT: arrival to first token. TPOT: mean time between later tokens. End-to-end latency: arrival to
last token. All in seconds, from the request's own ``*_time`` fields (``arrival_time`` is when it
arrived, not when the run started: a request that arrives late is not charged for the time before).
Throughput: output tokens per second of the run. Goodput: requests per second that met the latency
SLO (TTFT and TPOT limits); a fast system that misses the SLO has high throughput and low goodput.
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


def request_metrics(r: Request) -> dict:
    """Seconds: ttft (arrival to first token), tpot (mean gap between later tokens), e2e (arrival to last)."""
    if not r.finished or r.arrival_time is None or r.first_token_time is None or r.finished_time is None:
        raise ValueError(f"request {r.id!r} has not finished (or has no arrival time): no latency to measure")
    gaps = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
    return {"ttft": r.first_token_time - r.arrival_time, "tpot": statistics.fmean(gaps) if gaps else 0.0,
            "e2e": r.finished_time - r.arrival_time, "tokens": len(r.output)}


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
