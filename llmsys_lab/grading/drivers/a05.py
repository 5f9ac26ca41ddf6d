"""Assignment 05 (continuous batching): the student's Batcher run to completion on the harness's workloads, as the
notebook's `run` does. Per iteration: what each request produced, the arrived requests still waiting (in queue
order) and the blocks the running requests hold, as a flat int64 tensor. No answer is computed here."""
from __future__ import annotations

NONE, TOKEN, END = 0, 1, 2


def drive_batcher(fn, name, ns):
    """requests: [[id, prompt_len, output_len, arrival], ...] (in the order given to Batcher); kwargs: Batcher's
    keyword arguments; at most max_iters iterations are run."""
    def run(requests, kwargs, max_iters):
        import torch

        req = ns.get("Req")
        if req is None:
            raise NameError("name 'Req' is not defined")
        reqs = [req(rid, p, o, a) for rid, p, o, a in requests]
        index = {r[0]: i for i, r in enumerate(requests)}
        n = len(requests)
        b = fn(reqs, **kwargs)
        out, now = [], 1
        while (b.waiting or b.running) and now <= max_iters:
            produced = b.step(now)
            row = [NONE] * n
            for rid, what in dict(produced).items():
                if rid not in index or what not in ("token", "END"):
                    raise ValueError(f"step({now}) returned {rid!r}: {what!r}; expected request ids -> 'token' / 'END'")
                row[index[rid]] = TOKEN if what == "token" else END
            waiting = [index[r.id] for r in b.waiting if r.arrival <= now]
            out += row + waiting + [-1] * (n - len(waiting)) + [int(sum(r.blocks for r in b.running))]
            now += 1
        return torch.tensor(out, dtype=torch.int64)
    return run
