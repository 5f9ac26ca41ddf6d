"""The grader's code inside the grading kernel (see ``llmsys_lab.grading`` for the threat model).

``python -m llmsys_lab grade`` sends one cell of its own before the notebook (``install``) and wraps
each restored test cell in ``begin(...)`` / ``end(token)``:

* ``install`` runs before any submission cell. It takes a snapshot of what test cells rely on (the
  builtins, ``sys`` hooks and streams, IPython's exception handler, transformers and event
  callbacks, and the kit's helper modules ``llmsys_lab.checks`` / ``llmsys_lab.grading``, with the
  code objects of their functions) and adds an audit hook, which Python gives no way to remove,
  that refuses file access under the instructor's folders and signals to the grader's processes.
* ``record()`` follows each locked (instructor) cell: it notes the names that cell bound (helpers such
  as ``check_close``, a notebook's own ``check_equal``), so later cells cannot swap them.
* ``begin()`` starts each test cell: it puts everything from the snapshot back, then rebinds the
  recorded names, so a test runs with the instructor's helpers whatever earlier cells did.
* ``end(token)`` is the test cell's last statement. It prints a token the grader made up for this
  cell only; a test scores only when its token is in its output, so an exception that is swallowed
  by a hook (``set_custom_exc``, a patched ``showtraceback``) still scores 0: the cell never
  reached ``end``.
"""
from __future__ import annotations

import builtins
import os
import sys

MARK = "[llmsys-grader] test completed: "
_state: dict = {}


def _fn_parts(value):
    code = getattr(value, "__code__", None)
    if code is None:
        return None
    return (code, getattr(value, "__defaults__", None), getattr(value, "__kwdefaults__", None))


def _snapshot_module(module) -> dict:
    saved = dict(vars(module))
    parts = {name: _fn_parts(v) for name, v in saved.items() if _fn_parts(v) is not None}
    for name, v in saved.items():                       # methods of the module's classes (CheckFailed, ...)
        if isinstance(v, type) and v.__module__ == module.__name__:
            for attr, fn in vars(v).items():
                if _fn_parts(fn) is not None:
                    parts[f"{name}.{attr}"] = _fn_parts(fn)
    return {"module": module, "dict": saved, "parts": parts}


def _restore_module(snap) -> None:
    module, saved = snap["module"], snap["dict"]
    current = vars(module)
    for name in [n for n in current if n not in saved]:
        del current[name]
    current.update(saved)
    for name, (code, defaults, kwdefaults) in snap["parts"].items():
        owner, _, attr = name.rpartition(".")
        fn = vars(saved[owner]).get(attr) if owner else saved[name]
        fn.__code__, fn.__defaults__ = code, defaults
        if kwdefaults is not None or getattr(fn, "__kwdefaults__", None) is not None:
            fn.__kwdefaults__ = kwdefaults


def install(deny: list[str], protect: list[int]) -> None:
    """Called once, before the first submission cell (see the module docstring)."""
    import llmsys_lab.checks
    import llmsys_lab.grading

    shell = get_ipython()  # noqa: F821  (IPython puts it in builtins)
    _state.update(
        shell=shell, builtins=dict(vars(builtins)), stdout=sys.stdout, stderr=sys.stderr,
        excepthook=sys.excepthook, displayhook=sys.displayhook,
        cleanup=list(shell.input_transformers_cleanup), post=list(shell.input_transformers_post),
        ast=list(shell.ast_transformers),
        events={name: list(cbs) for name, cbs in shell.events.callbacks.items()},
        shell_methods=[(klass, dict(vars(klass))) for klass in type(shell).__mro__ if klass is not object],
        modules=[_snapshot_module(llmsys_lab.checks), _snapshot_module(llmsys_lab.grading),
                 _snapshot_module(sys.modules[__name__])],
        names={})
    _guard_files(tuple(os.path.realpath(p) for p in deny), tuple(protect))


def _guard_files(deny: tuple[str, ...], protect: tuple[int, ...]) -> None:
    realpath, fspath, sep = os.path.realpath, os.fspath, os.sep
    events = {"open", "os.listdir", "os.scandir", "os.link", "os.symlink", "os.rename", "os.remove", "os.rmdir",
              "os.chmod", "os.truncate", "shutil.copyfile", "shutil.copytree", "shutil.rmtree", "os.chdir",
              "glob.glob", "os.walk"}

    def denied(path) -> bool:
        try:
            path = fspath(path)
            if isinstance(path, bytes):
                path = path.decode(errors="replace")
            if not isinstance(path, str):
                return False
            real = realpath(path)
        except Exception:
            return False
        return any(real == d or real.startswith(d + sep) for d in deny)

    def hook(event, args):
        if event in events:
            for arg in args[:2]:
                if isinstance(arg, (str, bytes)) or hasattr(arg, "__fspath__"):
                    if denied(arg):
                        raise PermissionError(f"the grader does not let a submission read {arg}")
        elif event in ("os.kill", "os.killpg") and args and args[0] in protect:
            raise PermissionError("the grader does not let a submission signal the grader")

    sys.addaudithook(hook)


def before() -> None:
    """Before a locked cell: what the names are bound to now."""
    _state["pre"] = dict(_state["shell"].user_ns)


def record() -> None:
    """After a locked cell: remember the names it bound (rebound by begin())."""
    pre = _state.pop("pre", {})
    for name, value in _state["shell"].user_ns.items():
        if not name.startswith("_") and pre.get(name, _state) is not value:
            _state["names"][name] = (value, _fn_parts(value))


def begin() -> None:
    """Start of a test cell: undo what earlier cells did to the interpreter and the helpers."""
    s = _state
    sys.settrace(None)
    sys.setprofile(None)
    shell = s["shell"]
    b = vars(builtins)
    for name in [n for n in b if n not in s["builtins"]]:
        del b[name]
    b.update(s["builtins"])
    sys.stdout, sys.stderr = s["stdout"], s["stderr"]
    sys.excepthook, sys.displayhook = s["excepthook"], s["displayhook"]
    for klass, saved in s["shell_methods"]:          # run_cell, showtraceback, ... patched on a class
        for name, value in saved.items():
            if callable(value) and vars(klass).get(name) is not value:
                setattr(klass, name, value)
    methods = {n for _, saved in s["shell_methods"] for n, v in saved.items() if callable(v)}
    for name in [n for n in vars(shell) if n in methods]:     # ... or on the shell itself
        delattr(shell, name)
    shell.set_custom_exc((), None)
    shell.input_transformers_cleanup[:] = s["cleanup"]
    shell.input_transformers_post[:] = s["post"]
    shell.ast_transformers[:] = s["ast"]
    for name, cbs in shell.events.callbacks.items():
        cbs[:] = s["events"].get(name, [])
    for snap in s["modules"]:
        _restore_module(snap)
    ns = shell.user_ns
    for name, (value, parts) in s["names"].items():
        ns[name] = value
        if parts is not None:
            try:
                value.__code__, value.__defaults__, value.__kwdefaults__ = parts
            except (AttributeError, TypeError):
                pass


def end(token: str) -> None:
    """The last statement of a test cell: reached only when every check above it passed."""
    from llmsys_lab.checks import finish_own_code

    finish_own_code()                    # raises when the traced code called the kit (see check_own_code)
    _state["stdout"].write(f"{MARK}{token}\n")
    _state["stdout"].flush()
