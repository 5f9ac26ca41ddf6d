"""One OS sandbox per submission: bubblewrap (``bwrap``), with resource limits and a kill-all at the end.

``run(argv, ...)`` runs a command the way the grader runs a student's notebook:

* the whole file system read-only (``--ro-bind / /``): the Python environment, the kit and the rest of
  the machine can be read but not changed, so a submission cannot plant a ``.pth`` file, patch the
  kit or leave anything behind for the next submission;
* the paths in ``hide`` absent: an empty, read-only folder over each folder (``solutions/``, the
  ``--source`` folder) and an unreadable one over each file (a kit module an assignment forbids, and
  its byte-compiled copies);
* a private, empty ``/tmp`` (a tmpfs that disappears with the sandbox) that is also ``$HOME`` (the
  environment and the kit are bound back into it, read-only, where they live under /tmp); the
  only other writable place is the job folder ``work``, mounted at ``WORK`` (the job's inputs and
  outputs, in formats that cannot execute code);
* no network (a new network namespace with only the loopback), its own IPC, UTS and user namespaces,
  no capabilities, a new session (no terminal to inject keystrokes into);
* its own PID namespace: when the command ends, or the wall-time limit kills it, or the grader dies
  (``--die-with-parent``), the namespace's first process dies and the kernel kills every process
  in it -- ``setsid``, double forks and daemons included;
* limits (``prlimit``): CPU seconds, address space, size of a written file, open files.

Where bubblewrap cannot run (``available()`` says why), the grader refuses official grades unless
told ``--unsafe`` (see ``llmsys_lab.grading``). The sandbox is Linux only: bubblewrap needs user
namespaces (or root). The container recipe for other systems is in the README's instructor section.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError

WORK = "/tmp/job"          # where the job folder appears inside the sandbox
HOME = "/tmp/home"


@dataclass(frozen=True)
class Limits:
    """Per-submission limits. wall_s: seconds of wall time for the whole run; cpu_s: CPU seconds (all
    threads); memory: bytes of address space per process; file_size: bytes per written file."""
    wall_s: float = 1800.0
    cpu_s: int = 3600
    memory: int = 16 << 30
    file_size: int = 1 << 30
    open_files: int = 4096

    def __post_init__(self):
        for name in ("wall_s", "cpu_s", "memory", "file_size", "open_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"sandbox limit {name} must be a positive number, got {value!r}")


class SandboxUnavailable(LabError, RuntimeError):
    """bubblewrap is missing or cannot create its namespaces on this machine."""


def bwrap() -> str | None:
    return os.environ.get("LLMSYS_BWRAP") or shutil.which("bwrap")


_checked: dict = {}


def available() -> tuple[bool, str]:
    """(True, "") when a trivial command runs in the sandbox here, else (False, why)."""
    exe = bwrap()
    if exe is None:
        return False, ("bubblewrap (bwrap) is not installed; on Debian/Ubuntu: apt-get install bubblewrap "
                       "(`make sandbox-deps`), elsewhere see the README's instructor section")
    if exe not in _checked:
        try:
            done = subprocess.run(_bwrap_args(exe, work=None, hide=()) + ["true"], capture_output=True, text=True,
                                  timeout=60)
            _checked[exe] = (done.returncode == 0, "" if done.returncode == 0 else
                             f"{exe} cannot create a sandbox here ({done.stderr.strip()[-300:]}); user namespaces "
                             "may be disabled (sysctl kernel.unprivileged_userns_clone / "
                             "user.max_user_namespaces)")
        except (OSError, subprocess.TimeoutExpired) as err:
            _checked[exe] = (False, f"{exe} cannot run: {err}")
    return _checked[exe]


def visible_under_tmp() -> list[Path]:
    """What the private /tmp would hide but the run needs: the Python environment, the kit and the
    import path when they live under /tmp (a clone or a venv made there, as CI and pytest do). They are
    bound back read-only, before the hidden paths, so ``solutions/`` inside such a clone stays hidden."""
    import sys

    import llmsys_lab

    tmp = Path("/tmp").resolve()
    wanted = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path, Path(llmsys_lab.__file__).parent.parent,
              *os.environ.get("PYTHONPATH", "").split(os.pathsep)}
    found = set()
    for item in wanted:
        if not item:
            continue
        path = Path(item).resolve()
        if path.exists() and tmp in path.parents and not str(path).startswith((WORK, HOME)):
            found.add(path)
    return sorted(p for p in found if not any(q in p.parents for q in found))


def _bwrap_args(exe: str, work: Path | None, hide, replace: dict | None = None) -> list[str]:
    args = [exe, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--dir", HOME]
    for path in visible_under_tmp():
        args += ["--ro-bind", str(path), str(path)]
    for dev in sorted(Path("/dev").glob("nvidia*")) + [Path("/dev/dri"), Path("/dev/kfd")]:   # GPUs
        if dev.exists():
            args += ["--dev-bind", str(dev), str(dev)]
    hide = sorted({Path(p).resolve() for p in hide})
    for path in hide:
        if any(other in path.parents for other in hide):      # already inside a hidden folder
            continue
        if path.is_dir():
            args += ["--tmpfs", str(path), "--remount-ro", str(path)]
        elif path.exists():                 # unreadable (EACCES), and so are its byte-compiled copies
            args += ["--ro-bind", "/dev/null", str(path)]
            for cached in sorted((path.parent / "__pycache__").glob(f"{path.stem}.*.pyc")):
                args += ["--ro-bind", "/dev/null", str(cached)]
    for target, copy in (replace or {}).items():     # a file seen in place of another (a module without some parts)
        target = Path(target).resolve()
        args += ["--ro-bind", str(Path(copy).resolve()), str(target)]
        for cached in sorted((target.parent / "__pycache__").glob(f"{target.stem}.*.pyc")):
            args += ["--ro-bind", "/dev/null", str(cached)]
    if work is not None:
        args += ["--bind", str(Path(work).resolve()), WORK, "--chdir", WORK]
    return args


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


def command(argv, work: Path | None = None, hide=(), limits: Limits = Limits(), env: dict | None = None,
            replace: dict | None = None) -> list[str]:
    """The full command line (bwrap, then prlimit, then argv) that `run` starts."""
    exe = bwrap()
    if exe is None:
        raise SandboxUnavailable(available()[1])
    args = _bwrap_args(exe, work, hide, replace)
    args += ["--clearenv"]
    for key, value in sorted(_sandbox_env(env).items()):
        args += ["--setenv", key, value]
    prlimit = shutil.which("prlimit")
    limit = [prlimit, f"--cpu={int(limits.cpu_s)}", f"--as={int(limits.memory)}",
             f"--fsize={int(limits.file_size)}", f"--nofile={int(limits.open_files)}", "--"] if prlimit else []
    return args + ["--"] + limit + [str(a) for a in argv]


def _sandbox_env(extra: dict | None) -> dict:
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET",
            "OMP_NUM_THREADS", "LLMSYS_DEVICE", "PYTHONHASHSEED", "TERM")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"HOME": HOME, "TMPDIR": "/tmp", "PWD": WORK, "PYTHONDONTWRITEBYTECODE": "1",
                "JUPYTER_RUNTIME_DIR": f"{HOME}/.jupyter-runtime", "MPLCONFIGDIR": f"{HOME}/.matplotlib",
                "TRITON_CACHE_DIR": f"{HOME}/.triton"})
    env.update(extra or {})
    return env


def run(argv, work: Path | None = None, hide=(), limits: Limits = Limits(), env: dict | None = None,
        max_output: int = 1_000_000, replace: dict | None = None) -> Result:
    """Run argv in a fresh sandbox; wait at most limits.wall_s, then kill it (and everything it started).
    replace: {path: file} shows each file's contents at path (read-only)."""
    ok, why = available()
    if not ok:
        raise SandboxUnavailable(why)
    cmd = command(argv, work, hide, limits, env, replace)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=limits.wall_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            _kill(proc)
    return Result(proc.returncode, out.decode(errors="replace")[-max_output:],
                  err.decode(errors="replace")[-max_output:], timed_out)


def _kill(proc: subprocess.Popen) -> None:
    """bwrap leads its own process group; killing it ends the sandbox's PID namespace (--die-with-parent)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
