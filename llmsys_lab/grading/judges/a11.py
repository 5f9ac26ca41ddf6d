"""Assignment 11 (scaling laws): runs drawn per submission from a random law, budgets and models drawn too; the
fits, optima and losses the answers must match are computed here, outside the sandbox. The kit's scaling code
(which the in-kernel tests use as their reference) may not run while the probe calls the answers."""
from __future__ import annotations

import math

import torch

from ..harness import Call, Spec, _err

ASSIGNMENT = "11_scaling_laws"
DRIVERS = "llmsys_lab.grading.drivers.a11"
KEYS = ("E", "A", "B", "alpha", "beta")
FIT_RUNS = 3


def _uniform(g, lo, hi):
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _law(g) -> dict:
    """A law in the range of published fits (Chinchilla's: E 1.69, A 406, B 411, alpha 0.34, beta 0.28)."""
    return {"E": _uniform(g, 1.5, 2.2), "A": math.exp(_uniform(g, math.log(300), math.log(900))),
            "B": math.exp(_uniform(g, math.log(400), math.log(1500))), "alpha": _uniform(g, 0.28, 0.40),
            "beta": _uniform(g, 0.28, 0.38)}


def _loss(law, n, d):
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def _optimum(law, flops):
    """The closed form: N* = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
    a, b = law["alpha"], law["beta"]
    n = (a * law["A"] / (b * law["B"])) ** (1 / (a + b)) * (flops / 6) ** (b / (a + b))
    return n, flops / (6 * n)


def _runs(law, g, noise=0.002):
    """Seven model sizes around the optimum at each of six budgets (an IsoFLOP design), log-normal noise: a design
    on which a fit from a few starting points converges (fewer sizes or more noise leave it short of the optimum)."""
    n_out, d_out, l_out = [], [], []
    for c in (1e16, 1e17, 1e18, 1e19, 1e20, 1e21):
        n0, _ = _optimum(law, c)
        for f in (1 / 8, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
            n, d = n0 * f, c / (6 * n0 * f)
            n_out.append(n), d_out.append(d)
            l_out.append(_loss(law, n, d) * math.exp(noise * float(torch.randn((), generator=g, dtype=torch.float64))))
    return n_out, d_out, l_out


def calls(g: torch.Generator):
    out = []
    for i in range(FIT_RUNS):
        out.append(Call(f"fit/{i}", "fit_law", list(_runs(_law(g), g)), via=f"{DRIVERS}:drive_fit"))
    for i in range(3):
        law = _law(g)
        for j in range(2):
            flops = 10 ** _uniform(g, 17 + 4 * j, 21 + 4 * j)
            out.append(Call(f"optimal/{i}/{j}", "compute_optimal", [law, flops], via=f"{DRIVERS}:drive_optimal"))
    cases = {"longer": [], "bigger": []}
    while min(len(v) for v in cases.values()) < 3:
        law, n, d = _law(g), 10 ** _uniform(g, 7.5, 9.5), 10 ** _uniform(g, 8.5, 10.5)
        flops = 6 * n * d * 10 ** _uniform(g, 0.3, 3)
        lo, bi = _loss(law, n, flops / (6 * n)), _loss(law, flops / (6 * d), d)
        if abs(lo - bi) > 1e-3 * bi:                   # a clear answer
            cases["longer" if lo < bi else "bigger"].append((law, n, d, flops))
    for i, case in enumerate(cases["longer"][:3] + cases["bigger"][:3]):
        out.append(Call(f"choice/{i}", "longer_or_bigger", list(case), via=f"{DRIVERS}:drive_choice"))
    return out, {"drawn": torch.zeros(1)}


def _rel(got, want, rtol, what):
    if not math.isfinite(got) or abs(got - want) > rtol * abs(want):
        return f"{what} is {got:.6g}, expected {want:.6g} (tolerance {rtol:.2%})"
    return None


def _rms(law, n, d, l):
    return math.sqrt(sum(math.log(_loss(law, a, b) / c) ** 2 for a, b, c in zip(n, d, l)) / len(n))


def _judge_fit(t, outputs, errors):
    from ...scaling import fit_chinchilla

    for call in (c for c in t["__calls__"] if c.id.startswith("fit/")):
        if _err(errors, call.id):
            return _err(errors, call.id)
        got = outputs.get(call.id)
        if not isinstance(got, torch.Tensor) or got.numel() != 5:
            return f"{call.id}: fit_law must return a dict with the keys {KEYS}"
        law = dict(zip(KEYS, got.double().tolist()))
        if not all(math.isfinite(v) and v > 0 for v in law.values()):
            return f"{call.id}: every number of the law must be positive and finite, got {law}"
        n, d, l = call.args
        ref = fit_chinchilla(n, d, l, top=10, max_iter=1000).law.as_dict()   # converged
        if _rms(law, n, d, l) > _rms(ref, n, d, l) + 2e-3:
            return (f"{call.id}: the law misses the runs by {_rms(law, n, d, l):.4f} (RMS of log-loss residuals), "
                    f"the grader's fit by {_rms(ref, n, d, l):.4f}")
        for k in ("alpha", "beta"):
            if abs(law[k] - ref[k]) > 0.05:
                return f"{call.id}: {k} = {law[k]:.3f}, the grader's fit has {ref[k]:.3f} (tolerance 0.05)"
        for a, b in ((3e8, 3e11), (3e10, 3e9)):
            why = _rel(_loss(law, a, b), _loss(ref, a, b), 0.01, f"{call.id}: the predicted loss at N={a:.0e}, D={b:.0e}")
            if why:
                return why
    return None


def _judge_optimal(t, outputs, errors):
    for call in (c for c in t["__calls__"] if c.id.startswith("optimal/")):
        if _err(errors, call.id):
            return _err(errors, call.id)
        got = outputs.get(call.id)
        if not isinstance(got, torch.Tensor) or got.numel() != 2:
            return f"{call.id}: compute_optimal must return (N, D)"
        law, flops = call.args
        n, d = got.double().tolist()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in law.items())
        why = (_rel(n, _optimum(law, flops)[0], 5e-3, f"N* for the law ({shown}) at C = {flops:.3g}")
               or _rel(6 * n * d, flops, 1e-6, f"6 N* D* at C = {flops:.3g}"))
        if why:
            return f"{call.id}: {why}"
    return None


def _judge_choice(t, outputs, errors):
    for call in (c for c in t["__calls__"] if c.id.startswith("choice/")):
        if _err(errors, call.id):
            return _err(errors, call.id)
        got = outputs.get(call.id)
        if not isinstance(got, torch.Tensor) or got.numel() != 3:
            return f"{call.id}: longer_or_bigger must return (choice, loss_longer, loss_bigger)"
        law, n, d, flops = call.args
        choice, lo, bi = got.double().tolist()
        ref_lo, ref_bi = _loss(law, n, flops / (6 * n)), _loss(law, flops / (6 * d), d)
        what = f"N={n:.3g}, D={d:.3g}, C={flops:.3g}"
        why = (_rel(lo, ref_lo, 1e-4, f"{what}: the loss if trained longer")
               or _rel(bi, ref_bi, 1e-4, f"{what}: the loss if made bigger"))
        if why:
            return f"{call.id}: {why}"
        want = "longer" if ref_lo < ref_bi else "bigger"
        if ("longer", "bigger")[int(choice)] != want:
            return f"{call.id}: {what}: the choice is {('longer', 'bigger')[int(choice)]!r}, the law says {want!r}"
    return None


SPEC = Spec(
    hide=[], calls=calls,
    forbid=tuple(f"kit:scaling/{f}" for f in ("__init__.py", "fit.py", "laws.py", "family.py"))
    + ("kit:estimators/scaling.py",),
    judge={"test_fit_law": _judge_fit, "test_compute_optimal": _judge_optimal,
           "test_longer_or_bigger": _judge_choice})
