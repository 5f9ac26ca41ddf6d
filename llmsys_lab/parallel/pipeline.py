"""Pipeline (inter-operator) parallelism: consecutive layers on consecutive ranks.

Stage s holds layers [s L/p, (s+1) L/p) (stage 0 also the embedding, the last stage the final norm,
LM head and loss). Only point-to-point traffic: each micro-batch's activations (B/m, T, hidden)
go forward across each stage boundary and their gradients come back. The price is idle time: a
stage waits for its first input and for the last gradient. With m micro-batches of equal cost the
*bubble* is (p - 1) / (m + p - 1) of each stage's time (Huang et al., GPipe, 2019).

Two schedules of the same work:

* **GPipe**: all m forwards, then all m backwards. Every stage holds the activations of all m
  micro-batches at the end of the forward phase.
* **1F1B** (PipeDream-Flush: Narayanan et al., "Memory-Efficient Pipeline-Parallel DNN Training", 2021;
  the 1F1B order comes from PipeDream, 2019): stage s runs p - s - 1 warm-up forwards,
  then alternates one forward and one backward, then drains. Same bubble, but at most p - s
  micro-batches in flight: activation memory bounded by p instead of m.

``schedule`` writes the order of operations per stage; ``simulate`` plays it with given op costs
(the widget and the formula check); ``run_pipeline`` executes it with real send/recv and records,
per operation, how long the stage waited for its neighbour (the blocking receive) and when it was
busy (from the moment the receive returned to the end of the operation). Idle time is measured, so
a measured bubble is at least the formula's: the formula assumes equal stages and free communication.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..validate import ConfigError, ShapeError, check_int, check_number
from .comm import Traffic, check_same_shape, nbytes
from .launcher import device

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Op:
    kind: str        # "F" or "B"
    mb: int          # micro-batch index


def schedule(kind: str, stages: int, micro_batches: int) -> list[list[Op]]:
    """The order in which each stage runs its m forward and m backward operations."""
    if kind not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    check_int(stages, "stages", minimum=1)
    check_int(micro_batches, "micro_batches", minimum=1)
    m = micro_batches
    out = []
    for s in range(stages):
        if kind == "gpipe":
            ops = [Op("F", i) for i in range(m)] + [Op("B", i) for i in range(m)]
        else:
            warm = min(stages - s - 1, m)
            ops = [Op("F", i) for i in range(warm)]
            for i in range(m - warm):
                ops += [Op("F", warm + i), Op("B", i)]
            ops += [Op("B", i) for i in range(m - warm, m)]
        out.append(ops)
    return out


@dataclass(frozen=True)
class Event:
    """One operation of one stage: busy from `start` to `end` (seconds); before `start` the stage
    spent `wait` seconds blocked in the receive of this operation's input (0 where nothing is
    received, and in ``simulate``, whose ops start when their input is ready)."""
    stage: int
    kind: str
    mb: int
    start: float
    end: float
    wait: float = 0.0


def simulate(kind: str, stages: int, micro_batches: int, t_f: float = 1.0, t_b: float = 2.0) -> list[Event]:
    """Play a schedule with forward cost t_f and backward cost t_b per stage (no communication time).

    F(s, i) waits for F(s-1, i); B(s, i) waits for B(s+1, i) (the last stage: for its own F(s, i)).
    """
    check_number(t_f, "t_f (forward time per stage)", positive=True)
    check_number(t_b, "t_b (backward time per stage)", positive=True)
    plan = schedule(kind, stages, micro_batches)
    done: dict[tuple, float] = {}
    pos, free = [0] * stages, [0.0] * stages
    events = []
    while any(pos[s] < len(plan[s]) for s in range(stages)):
        progressed = False
        for s in range(stages):
            if pos[s] == len(plan[s]):
                continue
            op = plan[s][pos[s]]
            dep = (("F", s - 1, op.mb) if op.kind == "F" and s > 0 else
                   ("B", s + 1, op.mb) if op.kind == "B" and s < stages - 1 else
                   ("F", s, op.mb) if op.kind == "B" else None)
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done.get(dep, 0.0))
            end = start + (t_f if op.kind == "F" else t_b)
            done[(op.kind, s, op.mb)] = free[s] = end
            events.append(Event(s, op.kind, op.mb, start, end))
            pos[s] += 1
            progressed = True
        if not progressed:                                  # pragma: no cover - schedules are deadlock-free
            raise RuntimeError(f"schedule {kind} deadlocks")
    return events


def bubble_fraction(events: list[Event], stages: int) -> float:
    """Idle share of stage-time between the first operation's beginning (its receive included) and the
    last end: 1 - busy / (stages x span). Waiting in a receive is idle, not busy."""
    t0, t1 = min(e.start - e.wait for e in events), max(e.end for e in events)
    busy = sum(e.end - e.start for e in events)
    return 1.0 - busy / (stages * (t1 - t0))


def gpipe_bubble(stages: int, micro_batches: int) -> float:
    """(p - 1) / (m + p - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


def peak_in_flight(kind: str, stages: int, micro_batches: int) -> list[int]:
    """Per stage: the most micro-batches whose activations are held (forward done, backward not yet)."""
    peaks = []
    for ops in schedule(kind, stages, micro_batches):
        n = peak = 0
        for op in ops:
            n += 1 if op.kind == "F" else -1
            peak = max(peak, n)
        peaks.append(peak)
    return peaks


# ---- the model cut into stages ------------------------------------------------------------------
class Stage(nn.Module):
    """Stage `rank` of a ``LlamaLM`` cut into `world` stages of equal numbers of layers."""

    def __init__(self, model, rank: int, world: int):
        super().__init__()
        layers = model.config.num_layers
        if layers % world:
            raise ConfigError(f"num_layers = {layers} is not divisible by the number of pipeline stages {world}")
        per = layers // world
        self.rank, self.world = rank, world
        self.first, self.last = rank == 0, rank == world - 1
        self.embed_tokens = model.model.embed_tokens if self.first else None
        self.layers = nn.ModuleList(model.model.layers[rank * per:(rank + 1) * per])
        self.norm = model.model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed_tokens(x)
        positions = torch.arange(x.shape[1], device=x.device)
        for layer in self.layers:
            x = layer(x, positions=positions)
        return self.lm_head(self.norm(x)) if self.last else x


def run_pipeline(stage: Stage, batch: torch.Tensor, micro_batches: int, kind: str = "1f1b",
                 traffic: Traffic | None = None, hidden_size: int | None = None, extra_forward_s: float = 0.0):
    """One forward + backward over `batch` (token ids, same on every rank) in `micro_batches` pieces.

    Gradients accumulate in the stage's parameters (the mean loss over the batch). Returns
    (loss on the last stage else None, [Event] measured on this rank). Times are seconds since a
    shared barrier (``time.perf_counter``): each Event's `wait` is the time blocked in the receive of
    its input (the activation from the previous stage, the gradient from the next), its `start` the
    moment that receive returned, its `end` when the operation (compute and posting its send) was
    done. Sends are non-blocking so that a stage sending forward while its neighbour sends a gradient
    back cannot deadlock; receives block.

    extra_forward_s: seconds this stage sleeps after each forward (busy time: an uneven stage made
    on purpose, to watch its neighbours wait); 0 for the real pipeline.
    """
    if isinstance(extra_forward_s, bool) or not isinstance(extra_forward_s, (int, float)) or not 0 <= extra_forward_s < 60:
        raise ConfigError(f"extra_forward_s must be a number of seconds in [0, 60), got {extra_forward_s!r}")
    rank, world = stage.rank, stage.world
    check_same_shape(batch, "the pipeline's batch")
    if batch.shape[0] % micro_batches:
        raise ShapeError(f"batch of {batch.shape[0]} sequences does not split into {micro_batches} micro-batches")
    mbs = batch.chunk(micro_batches)
    hidden = hidden_size or stage.layers[0].config.hidden_size
    act_shape = (mbs[0].shape[0], batch.shape[1] - 1, hidden)
    dtype = next(stage.parameters()).dtype
    inputs, outputs, pending = {}, {}, []
    total_loss = torch.zeros((), device=batch.device)
    events = []
    dist.barrier()
    t0 = time.perf_counter()
    for op in schedule(kind, world, micro_batches)[rank]:
        begin = start = time.perf_counter() - t0      # start moves past a blocking receive: waiting is not busy
        ids = mbs[op.mb]
        if op.kind == "F":
            if stage.first:
                x = ids[:, :-1]
            else:
                x = torch.empty(act_shape, dtype=dtype, device=batch.device)
                dist.recv(x, rank - 1)
                if batch.is_cuda:
                    torch.cuda.synchronize(batch.device)   # NCCL's recv returns before the data is there
                start = time.perf_counter() - t0
                x.requires_grad_()
            y = stage(x)
            if extra_forward_s:
                time.sleep(extra_forward_s)
            inputs[op.mb] = x
            if stage.last:
                loss = F.cross_entropy(y.flatten(0, 1), ids[:, 1:].flatten()) / micro_batches
                outputs[op.mb] = loss
                total_loss += loss.detach()
            else:
                outputs[op.mb] = y
                y = y.detach()
                pending.append((dist.isend(y, rank + 1), y))
                if traffic is not None:
                    traffic.add("pp_send_activation", nbytes(y))
        else:
            out = outputs.pop(op.mb)
            if stage.last:
                out.backward()
            else:
                grad = torch.empty(act_shape, dtype=dtype, device=batch.device)
                dist.recv(grad, rank + 1)
                if batch.is_cuda:
                    torch.cuda.synchronize(batch.device)
                start = time.perf_counter() - t0
                out.backward(grad)
            x = inputs.pop(op.mb)
            if not stage.first:
                g = x.grad.contiguous()
                pending.append((dist.isend(g, rank - 1), g))
                if traffic is not None:
                    traffic.add("pp_send_gradient", nbytes(g))
        if batch.is_cuda:
            torch.cuda.synchronize(batch.device)    # busy until the GPU is done, not until the launches are
        events.append(Event(rank, op.kind, op.mb, start, time.perf_counter() - t0, start - begin))
    for req, _ in pending:
        req.wait()
    return (total_loss.item() if stage.last else None), events


def pp_bytes_per_step(batch: int, seq: int, hidden: int, stages: int, stage: int | None = None,
                      bytes_per_el: int = 4) -> float:
    """Bytes a stage sends per step: the activations of every token forward (all but the last
    stage) and their gradients backward (all but the first). stage None: a middle stage."""
    if stages == 1:
        return 0.0
    one_way = batch * seq * hidden * bytes_per_el
    if stage is None:
        return 2 * one_way
    return one_way * ((stage < stages - 1) + (stage > 0))


# ---- run on ranks ------------------------------------------------------------------------------
def time_pipeline(micro_batches: int = 4, batch_size: int = 8, seq: int = 9, slow_stage: int | None = None,
                  extra_forward_s: float = 0.0, seed: int = 0) -> dict:
    """On every rank: one timed step of each schedule on the lesson's small model (after one untimed
    step that sets up the connections). slow_stage sleeps extra_forward_s after each of its forwards
    (an uneven stage on purpose). Returns {kind: [(stage, kind, mb, start, end, wait), ...]}."""
    from ..model import LlamaLM
    from .data_parallel import tiny_config

    rank, world = dist.get_rank(), dist.get_world_size()
    if slow_stage is not None and not (isinstance(slow_stage, int) and 0 <= slow_stage < world):
        raise ConfigError(f"slow_stage must be a stage index in [0, {world}), got {slow_stage!r}")
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed + 1)
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=g).to(device())
    torch.manual_seed(seed)
    stage = Stage(LlamaLM(cfg).to(batch.device), rank, world)
    extra = extra_forward_s if rank == slow_stage else 0.0
    run_pipeline(stage, batch, micro_batches, SCHEDULES[0])
    out = {}
    for kind in SCHEDULES:
        stage.zero_grad(set_to_none=True)
        _, events = run_pipeline(stage, batch, micro_batches, kind, extra_forward_s=extra)
        out[kind] = [(e.stage, e.kind, e.mb, e.start, e.end, e.wait) for e in events]
    return out


def check_pipeline(batch_size: int = 4, seq: int = 9, micro_batches: int = 4, seed: int = 0) -> dict:
    """On every rank: GPipe and 1F1B vs the unsplit model (loss and gradients of this rank's stage)."""
    from ..model import LlamaLM
    from .data_parallel import lm_loss, tiny_config

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed + 1)
    batch = torch.randint(0, cfg.vocab_size, (batch_size, seq), generator=g).to(device())
    torch.manual_seed(seed)
    ref = LlamaLM(cfg).to(batch.device)
    ref_loss = lm_loss(ref, batch)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    # one untimed step first: the first messages between two ranks set up their connection (and a GPU
    # its kernels), which would otherwise land in the first schedule's timeline (seconds, not ms)
    run_pipeline(Stage(LlamaLM(cfg).to(batch.device), rank, world), batch, micro_batches, SCHEDULES[0], Traffic())
    out = {}
    for kind in SCHEDULES:
        torch.manual_seed(seed)
        model = LlamaLM(cfg).to(batch.device)
        stage = Stage(model, rank, world)
        traffic = Traffic()
        loss, events = run_pipeline(stage, batch, micro_batches, kind, traffic)
        stage_params = {id(p) for p in stage.parameters()}
        errs = [(p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()
                if id(p) in stage_params]
        out[kind] = {"loss_err": None if loss is None else abs(loss - ref_loss.item()),
                     "grad_err": max(errs), "n_params_checked": len(errs),
                     "order": [(e.kind, e.mb) for e in events],
                     "events": [(e.stage, e.kind, e.mb, e.start, e.end, e.wait) for e in events],
                     "bytes_sent": traffic.total}
    out["bytes_expected"] = pp_bytes_per_step(batch_size, seq - 1, cfg.hidden_size, world, rank)
    return out
