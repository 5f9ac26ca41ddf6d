"""The engine in one loop: a thread that owns the ``Engine`` and runs its iterations while HTTP
handlers (on the asyncio event loop) add and cancel requests.

Handlers never touch the engine. They put commands in an inbox (add a request, abort one); the
loop applies them **between iterations**, so an abort (a client went away, a stop string was seen)
frees the request's blocks before the next iteration runs. After each iteration the loop hands
every request's new tokens to its handler through an asyncio queue (``Stream``): ``("tokens",
[ids])``, then ``("done", finish_reason)``, or ``("error", message)``.

Backpressure: at most ``max_batch + max_queue`` requests are live (running or waiting); one more
is refused at once (``Overloaded``: the server answers 429 with the reason), never queued without
bound.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..engine import Engine
from ..errors import LabError
from ..sampling import SamplingParams
from ..scheduler import Request


class Overloaded(LabError, RuntimeError):
    """The queue is full: the request is refused (HTTP 429), not queued."""


class NotRunning(LabError, RuntimeError):
    """The engine loop has stopped (HTTP 503)."""


@dataclass(eq=False)
class Stream:
    """One request's side of the loop: its tokens arrive on `queue` (an asyncio.Queue)."""
    id: int
    prompt: list[int]
    sampling: SamplingParams
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    received: float = field(default_factory=time.perf_counter)     # when the server got it (seconds)
    request: Request | None = None            # the engine's, once added (engine thread only)
    emitted: int = 0                          # output tokens already handed over
    closed: bool = False                      # done, aborted or failed (no more items)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    def __init__(self, engine: Engine, max_queue: int = 64, eos_token_id: int | None = None):
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
            raise ValueError(f"max_queue must be an int >= 0 (requests waiting beyond the batch), got {max_queue!r}")
        self.engine, self.max_queue = engine, max_queue
        self.capacity = engine.scheduler.max_batch + max_queue
        self.eos = eos_token_id if eos_token_id is not None else engine.eos
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._live: dict[int, Stream] = {}          # engine thread: request id -> stream
        self._count = 0                             # live requests (submitted, not yet closed)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"submitted": 0, "finished": 0, "aborted": 0, "refused": 0, "failed": 0, "iterations": 0}
        self.error: str | None = None

    # ---- handler side (asyncio thread) ------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def submit(self, prompt: list[int], sampling: SamplingParams) -> Stream:
        if not self.running:
            raise NotRunning(f"the engine loop is not running{': ' + self.error if self.error else ''}")
        with self._lock:
            if self._count >= self.capacity:
                self.stats["refused"] += 1
                raise Overloaded(f"the server is at capacity: {self._count} requests running or waiting "
                                 f"(max_batch {self.engine.scheduler.max_batch} + max_queue {self.max_queue}); "
                                 "retry later")
            self._count += 1
            self.stats["submitted"] += 1
        s = Stream(next(self._ids), prompt, sampling, asyncio.Queue(), asyncio.get_running_loop())
        self._inbox.put(("add", s))
        self._wake.set()
        return s

    def abort(self, s: Stream) -> None:
        """Cancel `s` (its blocks are freed before the next iteration); nothing if it already ended."""
        self._inbox.put(("abort", s))
        self._wake.set()

    @property
    def live(self) -> int:
        return self._count

    # ---- the loop (engine thread) -----------------------------------------------------------
    def start(self) -> "EngineLoop":
        self._thread = threading.Thread(target=self._run, name="llmsys-engine-loop", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _close(self, s: Stream, item, stat: str) -> None:
        if s.closed:
            return
        s.closed = True
        if s.request is not None:
            self._live.pop(s.request.id, None)
            self.engine.scheduler.ids.discard(s.request.id)    # a long-running server keeps no record
        with self._lock:
            self._count -= 1
            self.stats[stat] += 1
        s.put(item)

    def _apply_inbox(self) -> None:
        eng = self.engine
        while True:
            try:
                cmd, s = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                if s.closed:
                    continue
                try:
                    s.request = eng.add_request(s.id, s.prompt, s.sampling.max_tokens, arrival_step=eng.iteration,
                                                sampling=s.sampling)
                except ValueError as e:      # checked by the server first; a last line of defence
                    self._close(s, ("error", str(e)), "failed")
                    continue
                self._live[s.id] = s
            elif cmd == "abort" and not s.closed:
                if s.request is not None:
                    eng.abort(s.request)
                self._close(s, ("done", "abort"), "aborted")

    def _finish_reason(self, r: Request) -> str:
        last = r.output[-1]
        return "stop" if last == self.eos or last in r.stop_token_ids else "length"

    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._apply_inbox()
            if not eng.scheduler.has_work:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            logged = len(eng.log)
            try:
                finished = eng.step()
            except Exception as e:          # a failed iteration fails its requests, never the server
                self.error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                for s in list(self._live.values()):
                    eng.abort(s.request)
                    self._close(s, ("error", f"the engine failed: {self.error}"), "failed")
                continue
            self.stats["iterations"] += 1
            if len(eng.log) > logged:
                for rid in eng.log[-1]["schedule"]["produced"]:
                    s = self._live.get(rid)
                    if s is not None and len(s.request.output) > s.emitted:
                        s.put(("tokens", s.request.output[s.emitted:]))
                        s.emitted = len(s.request.output)
            for r in finished:
                s = self._live.get(r.id)
                if s is not None:
                    self._close(s, ("done", self._finish_reason(r)), "finished")
            # a server runs for days: keep a bounded history
            del eng.log[:-256]
            eng.scheduler.finished.clear()
        for s in list(self._live.values()):
            self._close(s, ("error", "the server is shutting down"), "failed")
