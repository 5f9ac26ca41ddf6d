"""/metrics in the Prometheus text format (version 0.0.4): gauges read from the engine, counters,
and TTFT / TPOT / end-to-end histograms measured at the server (from when a request was received)."""
from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum, self.count = 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, c in zip(self.buckets, self.counts):
            total += c
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                  f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    def __init__(self):
        self.ttft = Histogram("llmsys_time_to_first_token_seconds", "Time from request received to its first token.",
                              TTFT_BUCKETS)
        self.tpot = Histogram("llmsys_time_per_output_token_seconds", "Mean time between a request's later tokens.",
                              TPOT_BUCKETS)
        self.e2e = Histogram("llmsys_e2e_request_latency_seconds", "Time from request received to its last token.",
                             E2E_BUCKETS)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.responses = {}                  # (endpoint, status) -> count
        self._lock = threading.Lock()

    def response(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.responses[(endpoint, status)] = self.responses.get((endpoint, status), 0) + 1

    def request_done(self, received: float, token_times: list[float], prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += len(token_times)
        if token_times:
            self.ttft.observe(token_times[0] - received)
            self.e2e.observe(token_times[-1] - received)
            if len(token_times) > 1:
                self.tpot.observe((token_times[-1] - token_times[0]) / (len(token_times) - 1))

    def render(self, loop) -> str:
        eng = loop.engine
        blocks = eng.blocks
        used = blocks.num_blocks - blocks.num_free
        gauges = [("llmsys_num_requests_running", "Requests in the running batch.", len(eng.scheduler.running)),
                  ("llmsys_num_requests_waiting", "Requests queued for admission.", len(eng.scheduler.waiting)),
                  ("llmsys_kv_blocks_used", "KV-cache blocks in use.", used),
                  ("llmsys_kv_blocks_total", "KV-cache blocks in the pool.", blocks.num_blocks),
                  ("llmsys_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", used / blocks.num_blocks),
                  ("llmsys_engine_iterations", "Engine iterations run.", loop.stats["iterations"])]
        lines = []
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        lines += ["# HELP llmsys_requests_total Requests by outcome.", "# TYPE llmsys_requests_total counter"]
        for outcome in ("submitted", "finished", "aborted", "refused", "failed"):
            lines.append(f'llmsys_requests_total{{outcome="{outcome}"}} {loop.stats[outcome]}')
        lines += ["# HELP llmsys_prompt_tokens_total Prompt tokens of finished requests.",
                  "# TYPE llmsys_prompt_tokens_total counter", f"llmsys_prompt_tokens_total {self.prompt_tokens}",
                  "# HELP llmsys_generation_tokens_total Tokens generated for finished requests.",
                  "# TYPE llmsys_generation_tokens_total counter",
                  f"llmsys_generation_tokens_total {self.generation_tokens}",
                  "# HELP llmsys_http_responses_total HTTP responses by endpoint and status.",
                  "# TYPE llmsys_http_responses_total counter"]
        with self._lock:
            for (ep, st), c in sorted(self.responses.items()):
                lines.append(f'llmsys_http_responses_total{{endpoint="{ep}",status="{st}"}} {c}')
        for h in (self.ttft, self.tpot, self.e2e):
            lines += h.render()
        return "\n".join(lines) + "\n"
