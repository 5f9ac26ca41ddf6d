"""Self-check helpers: compare a result with a reference and explain what differs.

Students call these in lessons and assignments. A failure names the first thing that is
wrong (type, shape, dtype, which element differs and by how much), not just
``AssertionError``. A pass prints one line that is identical on every machine (it states
the tolerance, not the device-dependent error), so notebooks can store it as output.
"""
from __future__ import annotations

import sys

import torch

from .errors import LabError


class CheckFailed(LabError, AssertionError):
    """A self-check found a difference; the message says which."""


def compare(actual, expected, name: str = "result", atol: float = 1e-5, rtol: float = 1e-5) -> str | None:
    """None when `actual` matches `expected` (shape, dtype, values); else what differs."""
    if not isinstance(actual, torch.Tensor):
        return f"{name} should be a torch.Tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"{name} has dtype {actual.dtype}, expected {expected.dtype}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if (nan_a != nan_e).any():
        idx = tuple(int(i) for i in torch.nonzero(nan_a != nan_e)[0])
        return (f"{name}[{idx}] is {a[idx].item()}, expected {e[idx].item()} (NaN mismatch: {name} has "
                f"{int(nan_a.sum())} NaN of {a.numel()} elements, the reference {int(nan_e.sum())})")
    a, e = a.masked_fill(nan_a, 0), e.masked_fill(nan_e, 0)
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        return (f"{name}[{idx}] is {a[idx].item():.6g}, expected {e[idx].item():.6g} "
                f"({int(bad.sum())} of {bad.numel()} elements differ; max |err| = {err.max().item():.3g}, "
                f"tolerance atol={atol:g}, rtol={rtol:g})")
    return None


def check_close(actual, expected, name: str = "result", atol: float = 1e-5, rtol: float = 1e-5,
                quiet: bool = False) -> None:
    """Raise CheckFailed explaining the first difference; print a one-line pass message."""
    problem = compare(actual, expected, name, atol, rtol)
    if problem:
        raise CheckFailed(problem)
    if not quiet:
        print(f"{name}: OK (matches within atol={atol:g}, rtol={rtol:g})")


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()


def agree(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> str:
    """'max |err| < tol: True' -- a line that reads the same on CPU and GPU."""
    return f"max |err| < {tol:g}: {max_abs_err(actual, expected) < tol}"


# ---- is this the student's own code? --------------------------------------------------------
# check_own_code(f) traces what f actually calls while the rest of the test cell runs
# (sys.setprofile): a call into an llmsys_lab function, or into a forbidden function such as
# torch.nn.functional.scaled_dot_product_attention, made while f (or a method of a class f) is
# running fails the test. The comparison is by the function being called, not by the names in f's
# source, so a default argument, a closure, a callable object, getattr or eval finds no way around
# it, and a helper of the student's own that happens to share a forbidden name is fine.
_ALLOWED_KIT = ("llmsys_lab.checks", "llmsys_lab.grading", "llmsys_lab._runtime")
_own: dict = {"targets": set(), "forbid": set(), "violations": [], "depth": 0, "profiler": None,
              "audit": False, "callback": False}


def _unwrap(value):
    value = getattr(value, "fn", value)                      # a @triton.jit kernel wraps its function
    value = getattr(value, "__func__", value)                # a bound method
    while hasattr(value, "__wrapped__"):                     # @torch.no_grad() and other decorators
        value = value.__wrapped__
    return value


def _target_codes(obj) -> set:
    """The code objects of `obj` (its methods, for a class) that were written where `obj` was:
    a decorator's wrapper (shared with every function it decorates, the kit's too) is left out."""
    codes, seen = set(), set()
    home = getattr(_unwrap(obj), "__module__", None) or "__main__"

    def visit(value):
        if id(value) in seen:
            return
        seen.add(id(value))
        value = _unwrap(value)
        if hasattr(value, "__code__") and getattr(value, "__module__", home) != home:
            return
        if isinstance(value, type):
            for attr in vars(value).values():
                for part in (attr, getattr(attr, "__func__", None), getattr(attr, "fget", None),
                             getattr(attr, "fset", None)):
                    if part is not None and hasattr(part, "__code__"):
                        visit(part)
        elif hasattr(value, "__code__"):
            codes.add(value.__code__)
            for const in value.__code__.co_consts:          # nested functions and lambdas
                if hasattr(const, "co_code"):
                    codes.add(const)
        elif callable(value):
            visit(type(value))                               # a callable object: its class's methods
    visit(obj)
    return codes


def _kit_module(frame) -> str | None:
    name = frame.f_globals.get("__name__", "") or ""
    return name if name.split(".")[0] == "llmsys_lab" and not name.startswith(_ALLOWED_KIT) else None


def _inside_kit_module_call(frame) -> bool:
    """A kit frame run by torch's Module call of a kit module (the kit's model, given to the code)."""
    while frame is not None and _kit_module(frame):
        frame = frame.f_back
    if frame is None or not (frame.f_globals.get("__name__", "") or "").startswith("torch.nn.modules"):
        return False
    owner = frame.f_locals.get("self")
    return (type(owner).__module__ or "").split(".")[0] == "llmsys_lab"


def _called_by_kit(frame) -> bool:
    """The kit calling itself (inside a kit function the test allowed or gave to the code): the
    student's code did not make this call; its own call into the kit was judged when it was made."""
    return frame.f_back is not None and _kit_module(frame.f_back) is not None


def _allowed(frame, allow: set) -> bool:
    """A call the test allows, named by function, Class.method, class, or module (last component)."""
    if not allow:
        return False
    code = frame.f_code
    qual = getattr(code, "co_qualname", code.co_name)
    module = (frame.f_globals.get("__name__", "") or "").rsplit(".", 1)[-1]
    return bool({code.co_name, qual, qual.split(".")[0], module} & allow)


def _violation(what: str) -> None:
    _own["violations"].append(what)
    raise CheckFailed(f"{what}: this exercise asks for your own implementation (the kit's version, or the "
                      "forbidden function, is the reference it is checked against)")


def _profile(frame, event, arg):
    own = _own
    if event == "call":
        if frame.f_code in own["targets"]:
            own["depth"] += 1
        elif own["depth"] and _kit_module(frame) and not _inside_kit_module_call(frame) \
                and not _called_by_kit(frame) and not _allowed(frame, own.get("allow", set())):
            _violation(f"your code called {frame.f_code.co_qualname} (from {_kit_module(frame)})")
        elif own["depth"] and frame.f_code.co_name in own["forbid_names"] and \
                frame.f_globals.get("__name__") != "__main__" and not _called_by_kit(frame):
            _violation(f"your code called {frame.f_code.co_name} (from {frame.f_globals.get('__name__')})")
    elif event == "return":
        if frame.f_code in own["targets"] and own["depth"]:
            own["depth"] -= 1
    elif event == "c_call" and own["depth"]:
        if arg in own["forbid"] or getattr(arg, "__name__", None) in own["forbid_names"]:
            _violation(f"your code called {getattr(arg, '__module__', None) or 'torch'}.{arg.__name__}")


def _thread_profile(frame, event, arg):
    """Other threads: any kit or forbidden call while the traced code runs counts."""
    if _own["depth"] and event == "call" and _kit_module(frame):
        _own["violations"].append(f"a thread called {frame.f_code.co_qualname} (from {_kit_module(frame)})")


def _audit(event, args):
    if event in ("sys.setprofile", "sys.settrace") and _own["depth"]:
        _own["violations"].append(f"your code called {event} while it was being checked")


def _forbidden_objects(names) -> set:
    import torch.nn.functional as F

    found = set()
    for name in names:
        for home in (F, torch, getattr(torch._C, "_nn", None), getattr(torch.ops, "aten", None)):
            obj = getattr(home, name, None) if home is not None else None
            if obj is not None:
                found.add(obj)
    return found


def check_own_code(obj, forbid: tuple[str, ...] = (), allow: tuple[str, ...] = ()) -> None:
    """Fail the test if `obj` (a function, class, callable object or @triton.jit kernel) calls into
    the kit or a function in `forbid` while the rest of this test cell runs.

    `allow`: names of kit functions the code may call. A compiled Triton kernel runs no Python, so
    a kernel's source is also checked for kit kernels it would inline (`kit_references`).
    """
    import threading

    if hasattr(obj, "fn"):                                   # @triton.jit: what it would inline
        refs = kit_references(obj, forbid, allow)
        if refs:
            raise CheckFailed(f"{getattr(obj, '__name__', obj)} uses {', '.join(refs)}: this exercise asks for "
                              "your own implementation (the kit's version is the reference it is checked against)")
    _own["targets"] |= _target_codes(obj)
    _own["forbid"] |= _forbidden_objects(forbid)
    _own["forbid_names"] = set(_own.get("forbid_names", set())) | set(forbid)
    _own["allow"] = set(allow)
    if not _own["audit"]:
        sys.addaudithook(_audit)                             # cannot be removed: switching tracing off is seen
        _own["audit"] = True
    _own["profiler"] = _profile
    sys.setprofile(_profile)
    threading.setprofile(_thread_profile)
    try:
        shell = get_ipython()  # noqa: F821
    except NameError:
        return
    if _after_cell not in shell.events.callbacks.get("post_run_cell", []):
        shell.events.register("post_run_cell", _after_cell)


def finish_own_code() -> None:
    """End tracing; raise CheckFailed if the traced code called the kit (even if it caught the error)."""
    import threading

    profiler_gone = bool(_own["targets"]) and sys.getprofile() is not _own["profiler"] and not _own["violations"]
    sys.setprofile(None)
    threading.setprofile(None)
    violations = list(_own["violations"])
    if profiler_gone:
        violations.append("the call tracing was switched off while the test ran")
    _own.update(targets=set(), forbid=set(), forbid_names=set(), violations=[], depth=0, profiler=None)
    if violations:
        raise CheckFailed(f"{violations[0]}: this exercise asks for your own implementation")


def _after_cell(result=None) -> None:
    """IPython post_run_cell: a violation the cell caught still fails it (a line on stderr)."""
    try:
        finish_own_code()
    except CheckFailed as err:
        if result is None or result.error_in_exec is None:
            print(f"CheckFailed: {err}", file=sys.stderr)


def kit_references(obj, forbid: tuple[str, ...] = (), allow: tuple[str, ...] = ()) -> list[str]:
    """Names that `obj`'s code (and the notebook functions it uses) takes from llmsys_lab or that are
    in `forbid`. Only a static look at the source: check_own_code traces the real calls."""
    import types

    found: list[str] = []
    seen: set[int] = set()

    def visit_code(code, glb) -> None:
        for name in code.co_names:
            if name in forbid and name not in found and not (name in glb and
                                                             getattr(glb[name], "__module__", "") == glb.get("__name__")):
                found.append(name)
            if name in allow or name not in glb:
                continue
            value = glb[name]
            module = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", "") or ""
            if module.split(".")[0] == "llmsys_lab" and not module.startswith(_ALLOWED_KIT) and name not in found:
                found.append(f"{name} (from {module})")
            elif module == glb.get("__name__"):
                visit(value)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                visit_code(const, glb)

    def visit(value) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, type):
            for attr in vars(value).values():
                visit(getattr(attr, "__func__", getattr(attr, "fget", attr)))
        fn = getattr(value, "fn", value)
        if isinstance(fn, types.FunctionType):
            visit_code(fn.__code__, fn.__globals__)

    visit(obj)
    return found
