"""Run a function on N ranks with real ``torch.distributed`` process groups.

``launch(fn, world_size)`` starts ``world_size`` processes, joins them into one process group
(gloo on CPU, NCCL when every rank has its own GPU), calls ``fn(*args, **kwargs)`` on every rank
and returns the list of the ranks' return values to the caller, a notebook cell included.

Why processes and files:

* Rendezvous through a file store in a fresh temporary folder: two jobs on one machine can never
  pick the same port, because there is no port.
* Each rank writes its result (or its traceback) to that folder and exits; the caller polls the
  processes. A rank that raises or dies makes the caller stop every other rank (which may be
  blocked in a collective, waiting for the dead one) and raise ``RankError`` naming the rank and
  its error. A job past ``timeout`` seconds is stopped the same way (``RankTimeout``). Nothing is
  left running.
* The processes are *spawned*, so ``fn`` must be importable (a function of a module). A function
  defined in a notebook cell cannot be pickled to a fresh process; for those, ``launch`` ships the
  function's source text instead (plus the sources of ``helpers``) and each rank executes it in a
  namespace that already holds ``torch``, ``dist`` (torch.distributed), ``math``, ``nn`` and ``device``
  (this rank's device: its GPU under NCCL, else the CPU); the
  functions it calls go along as ``helpers``, and imports it needs as a ``preamble`` string.

Under ``torchrun`` (the environment variables RANK, WORLD_SIZE, MASTER_ADDR are set) use
``python -m torch.distributed.run --standalone --nproc-per-node N -m llmsys_lab.parallel.launcher MODULE:FUNCTION``
(``--standalone`` lets torchrun pick a free port):
the process group comes from the environment and rank 0 prints the results.
"""
from __future__ import annotations

import datetime
import importlib
import inspect
import os
import pickle
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..errors import LabError
from ..validate import ConfigError, check_number


class RankError(LabError, RuntimeError):
    """A rank raised or died; the message names the rank and carries its traceback."""


class RankTimeout(RankError):
    """The job did not finish within its timeout; every rank was stopped."""


@dataclass(frozen=True)
class Job:
    """What each rank needs to run its part (pickled to the spawned process)."""
    target: object                 # the function itself, or (source, name) to execute
    args: tuple
    kwargs: dict
    world_size: int
    backend: str
    folder: str
    timeout: float
    threads: int


def choose_backend(world_size: int, backend: str = "auto") -> str:
    """NCCL when every rank can have a GPU of its own, else gloo (CPU)."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"backend must be 'auto', 'gloo' or 'nccl', got {backend!r}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ConfigError(f"backend='nccl' needs one GPU per rank: {world_size} ranks, "
                          f"{torch.cuda.device_count()} GPUs")
    return backend


def device() -> torch.device:
    """This rank's device: its own GPU under NCCL, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _importable(fn) -> bool:
    module = getattr(fn, "__module__", None)
    if module in (None, "__main__") or "<locals>" in getattr(fn, "__qualname__", "<locals>"):
        return False
    try:
        obj = importlib.import_module(module)
        for part in fn.__qualname__.split("."):
            obj = getattr(obj, part)
        return obj is fn
    except Exception:  # noqa: BLE001 - anything that prevents import by name
        return False


def _source_of(fn) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as e:
        raise ConfigError(
            f"{getattr(fn, '__name__', fn)!r} is not importable by name (defined in a notebook cell or "
            f"inside another function) and its source is not available ({e}); define it in a module") from e


def _target(fn, helpers, preamble: str = "") -> object:
    if not callable(fn):
        raise TypeError(f"launch needs a function to run on every rank, got {type(fn).__name__}")
    for f in (fn, *helpers):
        if getattr(f, "__name__", None) == "<lambda>":
            raise ConfigError("launch cannot ship a lambda to the ranks (its source is one line of a larger "
                              "expression, and it has no name to call): define the function with def")
    if _importable(fn) and not helpers and not preamble:
        return fn
    sources = [textwrap.dedent(preamble)] + [_source_of(h) for h in helpers] + [_source_of(fn)]
    return ("\n\n".join(sources), fn.__name__)


def _to_cpu(obj):
    """Results travel through files: tensors go to the CPU and leave autograd."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj) if not hasattr(obj, "_fields") else type(obj)(
            *(_to_cpu(v) for v in obj))
    return obj


def _resolve(target):
    if callable(target):
        return target
    source, name = target
    namespace = {"__name__": "__rank__", "torch": torch, "dist": dist, "math": __import__("math"),
                 "nn": torch.nn, "device": device}
    exec(compile(source, f"<source of {name}>", "exec"), namespace)   # noqa: S102 - the caller's own code
    return namespace[name]


def _worker(rank: int, job: Job) -> None:
    """Body of one spawned rank: join the group, run, write result or traceback, leave."""
    status = 1
    try:
        if job.backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        store = dist.FileStore(os.path.join(job.folder, "store"), job.world_size)
        dist.init_process_group(job.backend, store=store, rank=rank, world_size=job.world_size,
                                timeout=datetime.timedelta(seconds=job.timeout))
        open(os.path.join(job.folder, f"ready{rank}"), "w").close()
        torch.set_num_threads(job.threads)     # N ranks share the cores: no oversubscription
        torch.manual_seed(0)
        result = _resolve(job.target)(*job.args, **job.kwargs)
        torch.save(_to_cpu(result), os.path.join(job.folder, f"result{rank}.pt"))
        status = 0
    except BaseException as e:  # noqa: BLE001 - every failure is reported to the caller
        with open(os.path.join(job.folder, f"error{rank}.txt"), "w") as f:
            what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            f.write(f"{what}\n\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            if status == 0:
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001
                    pass
        sys.stdout.flush()
        os._exit(status)          # no lingering threads of the process group keep a rank alive


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def launch(fn, world_size: int = 2, args: tuple = (), kwargs: dict | None = None, backend: str = "auto",
           timeout: float = 60.0, helpers: tuple = (), preamble: str = "",
           startup_timeout: float = 120.0) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the ranks' results, rank 0 first.

    Raises ``RankError`` (with the failing rank's traceback) if any rank raises or dies, and
    helpers: more functions of the caller's (notebook) to ship with fn as source; preamble: code
    (imports) the ranks run before them. ``RankTimeout`` if the job runs past ``timeout`` seconds after every rank joined the process
    group (starting the interpreters has its own ``startup_timeout``); every rank is stopped either way.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"world_size must be a positive int, got {world_size!r}")
    check_number(timeout, "timeout (seconds)", positive=True)
    check_number(startup_timeout, "startup_timeout (seconds)", positive=True)
    backend = choose_backend(world_size, backend)
    target = _target(fn, tuple(helpers), preamble)
    try:
        pickle.dumps((args, kwargs or {}))
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"the arguments of launch must be picklable to reach the ranks: {e}") from e
    folder = tempfile.mkdtemp(prefix="llmsys_parallel_")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    job = Job(target, tuple(args), dict(kwargs or {}), world_size, backend, folder, float(timeout), threads)
    ctx = mp.get_context("spawn")
    procs = []
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_worker, args=(rank, job), daemon=True, name=f"rank{rank}")
            p.start()
            procs.append(p)
        deadline, started = time.monotonic() + startup_timeout, False
        while True:
            if not started and all(os.path.exists(os.path.join(folder, f"ready{r}")) for r in range(world_size)):
                deadline, started = time.monotonic() + timeout, True
            codes = [p.exitcode for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                _stop(procs)
                raise RankError(_failure_message(folder, failed, codes))
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                waiting = [r for r, c in enumerate(codes) if c is None]
                _stop(procs)
                if not started:
                    raise RankTimeout(f"the {world_size} ranks did not all start and join the process group "
                                      f"within {startup_timeout:.0f} s; all ranks were stopped")
                raise RankTimeout(f"ranks {waiting} of {world_size} did not finish within {timeout:g} s "
                                  f"(a rank waiting in a collective that another rank never joined?); "
                                  f"all ranks were stopped")
            time.sleep(0.02)
        return [torch.load(os.path.join(folder, f"result{r}.pt"), weights_only=False) for r in range(world_size)]
    finally:
        _stop(procs)
        shutil.rmtree(folder, ignore_errors=True)


def _failure_message(folder: str, failed: list, codes: list) -> str:
    parts = []
    for r in failed:
        path = os.path.join(folder, f"error{r}.txt")
        if os.path.exists(path):
            with open(path) as f:
                parts.append(f"rank {r} raised {f.read().strip()}")
        else:
            parts.append(f"rank {r} died with exit code {codes[r]} (killed, or crashed in native code)")
    first = parts[0].splitlines()[0]
    return (f"{len(failed)} of {len(codes)} ranks failed; the others were stopped. {first}\n\n"
            + "\n\n".join(parts))


# ---- torchrun ---------------------------------------------------------------------------------
def run_under_torchrun(spec: str):
    """Join the process group torchrun describes in the environment and run MODULE:FUNCTION."""
    module, _, name = spec.partition(":")
    if not name:
        raise ConfigError(f"expected MODULE:FUNCTION, got {spec!r}")
    fn = getattr(importlib.import_module(module), name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = choose_backend(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    torch.manual_seed(0)
    try:
        result = fn()
    finally:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":  # pragma: no cover - exercised through torchrun
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun --nproc-per-node N -m llmsys_lab.parallel.launcher MODULE:FUNCTION")
    out = run_under_torchrun(sys.argv[1])
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
