"""Lesson 11's scaling-law code: the laws, the Chinchilla fits (recovering known exponents from synthetic runs), the
IsoFLOP profiles, the model family and its training loop, the explorer view, and the stored family results."""
from __future__ import annotations

import math

import pytest
import torch

from llmsys_lab import estimators
from llmsys_lab.benchmarking import load_results
from llmsys_lab.scaling import (CHINCHILLA, SLIDE_LAW, ChinchillaLaw, bootstrap_fits, compute_optimal_grid,
                                fit_chinchilla, fit_power_law, isoflop_exponents, isoflop_profiles, kaplan_loss,
                                mean_estimator_error, rosenfeld_error, spread)
from llmsys_lab.scaling import family
from llmsys_lab.training import evaluate, next_token_loss, train_loop
from llmsys_lab.validate import ConfigError

TRUE = ChinchillaLaw(E=1.8, A=300.0, B=500.0, alpha=0.35, beta=0.30)


def synthetic_runs(law=TRUE, noise=0.005, seed=0):
    """Runs on a 6 x 5 grid of (N, D), losses from `law` times log-normal noise."""
    n = torch.logspace(6, 9, 6, dtype=torch.float64).repeat_interleave(5)
    d = torch.logspace(8, 11, 5, dtype=torch.float64).repeat(6)
    gen = torch.Generator().manual_seed(seed)
    return n, d, law.loss(n, d) * torch.exp(noise * torch.randn(len(n), generator=gen, dtype=torch.float64))


# ---- the data scaling law of a mean ----------------------------------------------------------------------
def test_mean_error_is_sigma_squared_over_n_with_slope_minus_one():
    ns = [1, 4, 16, 64, 256]
    errors = mean_estimator_error(ns, sigma=2.0, trials=4000, seed=0)
    for n, e in zip(ns, errors):
        assert e == pytest.approx(4.0 / n, rel=0.1), (n, e)
    slope, intercept = fit_power_law(ns, errors)
    assert slope == pytest.approx(-1.0, abs=0.05)
    assert intercept == pytest.approx(2 * math.log(2.0), abs=0.1)        # log(Error) = -log n + 2 log sigma


def test_fit_power_law_is_exact_on_a_power_law():
    x = [1.0, 10.0, 100.0, 1000.0]
    slope, intercept = fit_power_law(x, [3.0 * v**-0.5 for v in x])
    assert slope == pytest.approx(-0.5, abs=1e-9) and intercept == pytest.approx(math.log(3.0), abs=1e-9)


def test_bad_inputs_to_the_simple_laws():
    with pytest.raises(ConfigError, match="sigma"):
        mean_estimator_error([1, 2], sigma=0)
    with pytest.raises(ConfigError, match="whole numbers"):
        mean_estimator_error([1.5, 2])
    with pytest.raises(ConfigError, match="trials"):
        mean_estimator_error([1, 2], trials=1)
    with pytest.raises(ConfigError, match="same length"):
        fit_power_law([1, 2, 3], [1, 2])
    with pytest.raises(ConfigError, match="two distinct"):
        fit_power_law([2, 2], [1, 3])
    with pytest.raises(ConfigError, match="positive"):
        fit_power_law([1, -2], [1, 2])
    with pytest.raises(TypeError, match="numbers"):
        fit_power_law("abc", [1, 2, 3])


# ---- Chinchilla's law and the compute-optimal model --------------------------------------------------------
@pytest.mark.parametrize("flops", [1e18, 5.76e23, 1e25])
def test_closed_form_optimum_equals_a_grid_search_and_the_lesson_02_estimator(flops):
    n, d = CHINCHILLA.compute_optimal(flops)
    assert 6 * n * d == pytest.approx(flops, rel=1e-12)
    n_grid, _ = compute_optimal_grid(CHINCHILLA, flops, points=20001)
    assert n == pytest.approx(n_grid, rel=2e-3)
    ref = estimators.compute_optimal(flops)
    assert (n, d) == (pytest.approx(ref.params, rel=1e-12), pytest.approx(ref.tokens, rel=1e-12))
    assert CHINCHILLA.loss(n, d) <= min(CHINCHILLA.loss(n * f, flops / (6 * n * f)) for f in (0.8, 1.25))


def test_exponent_of_the_optimum_and_the_slide_law():
    assert CHINCHILLA.exponent_n == pytest.approx(0.28 / 0.62)
    n1, _ = CHINCHILLA.compute_optimal(1e20)
    n2, _ = CHINCHILLA.compute_optimal(1e22)
    assert math.log(n2 / n1) / math.log(100) == pytest.approx(CHINCHILLA.exponent_n, rel=1e-9)
    assert SLIDE_LAW.beta == 0.29 and SLIDE_LAW.alpha == CHINCHILLA.alpha


def test_law_validates_and_broadcasts():
    with pytest.raises(ConfigError, match="alpha"):
        ChinchillaLaw(E=1, A=1, B=1, alpha=0, beta=0.3)
    with pytest.raises(ConfigError, match="n_params"):
        TRUE.loss(-1.0, 1e9)
    with pytest.raises(ConfigError, match="same length"):
        TRUE.loss([1e6, 1e7], [1e9, 1e10, 1e11])
    with pytest.raises(ConfigError, match="flops"):
        TRUE.compute_optimal(0)
    out = TRUE.loss([1e6, 1e7], 1e9)
    assert out.shape == (2,) and float(out[0]) == pytest.approx(TRUE.loss(1e6, 1e9))


def test_kaplan_form_as_published_and_its_limits():
    n, d = 1e9, 1e10
    expected = ((8.8e13 / n) ** (0.076 / 0.095) + 5.4e13 / d) ** 0.095
    assert kaplan_loss(n, d) == pytest.approx(expected, rel=1e-12)
    assert kaplan_loss(n, 1e300) == pytest.approx((8.8e13 / n) ** 0.076, rel=1e-9)      # infinite data: L(N)
    assert kaplan_loss(1e300, d) == pytest.approx((5.4e13 / d) ** 0.095, rel=1e-9)      # infinite model: L(D)
    with pytest.raises(ConfigError, match="alpha_D"):
        kaplan_loss(n, d, alpha_D=0)


def test_rosenfeld_is_chinchillas_form_with_other_letters():
    assert rosenfeld_error(1e10, 1e9, alpha=TRUE.beta, beta=TRUE.alpha, c=TRUE.E, a=TRUE.B, b=TRUE.A) == \
        pytest.approx(TRUE.loss(1e9, 1e10), rel=1e-12)
    with pytest.raises(ConfigError, match="irreducible"):
        rosenfeld_error(1e10, 1e9, 0.3, 0.3, c=-1)


# ---- approach 3: the parametric fit ---------------------------------------------------------------------------
def test_fit_recovers_known_exponents_from_synthetic_runs():
    n, d, y = synthetic_runs(noise=0.005)
    fit = fit_chinchilla(n, d, y)
    assert fit.law.alpha == pytest.approx(TRUE.alpha, abs=0.03)
    assert fit.law.beta == pytest.approx(TRUE.beta, abs=0.03)
    assert fit.law.E == pytest.approx(TRUE.E, rel=0.05)
    # the fitted law predicts an unseen run and the compute-optimal size
    assert fit.law.loss(3e7, 3e9) == pytest.approx(TRUE.loss(3e7, 3e9), rel=0.01)
    assert fit.law.compute_optimal(1e21)[0] == pytest.approx(TRUE.compute_optimal(1e21)[0], rel=0.3)


def test_fit_without_noise_is_exact_and_robust_to_an_outlier():
    n, d, y = synthetic_runs(noise=0.0)
    exact = fit_chinchilla(n, d, y).law
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(exact, name) == pytest.approx(getattr(TRUE, name), rel=0.02), name
    y_bad = y.clone()
    y_bad[7] *= 1.5                                                # one run went badly wrong
    robust = fit_chinchilla(n, d, y_bad).law
    assert robust.alpha == pytest.approx(TRUE.alpha, abs=0.02) and robust.beta == pytest.approx(TRUE.beta, abs=0.02)


def test_bootstrap_interval_covers_the_true_exponents():
    n, d, y = synthetic_runs(noise=0.01, seed=1)
    fit = fit_chinchilla(n, d, y)
    laws = bootstrap_fits(n, d, y, samples=12, seed=0, start=fit.law)
    assert len(laws) >= 6
    mid, lo, hi = spread(laws, "alpha", q=0.99)
    assert lo <= mid <= hi and lo - 0.03 <= TRUE.alpha <= hi + 0.03
    with pytest.raises(ConfigError, match="field"):
        spread(laws, "gamma")


def test_fit_rejects_bad_runs():
    n, d, y = synthetic_runs()
    with pytest.raises(ConfigError, match="one entry per run"):
        fit_chinchilla(n, d[:-1], y)
    with pytest.raises(ConfigError, match="at least 5 runs"):
        fit_chinchilla(n[:4], d[:4], y[:4])
    with pytest.raises(ConfigError, match="losses"):
        fit_chinchilla(n, d, -y)
    with pytest.raises(ConfigError, match="delta"):
        fit_chinchilla(n, d, y, delta=0)
    with pytest.raises(ConfigError, match="grid needs"):
        fit_chinchilla(n, d, y, grid={"a": (0,)})
    with pytest.raises(ConfigError, match="samples"):
        bootstrap_fits(n, d, y, samples=1)
    with pytest.raises(TypeError, match="start"):
        bootstrap_fits(n, d, y, samples=2, start=(1, 2))


# ---- approach 2: IsoFLOP profiles -----------------------------------------------------------------------------
def test_isoflop_minima_follow_the_law():
    budgets = [1e18, 1e19, 1e20, 1e21]
    runs = []
    for c in budgets:
        n_opt, _ = TRUE.compute_optimal(c)
        for f in (0.25, 0.5, 1.0, 2.0, 4.0):
            runs.append((n_opt * f, c / (6 * n_opt * f)))
    n, d = [r[0] for r in runs], [r[1] for r in runs]
    profiles = isoflop_profiles(n, d, TRUE.loss(n, d).tolist())
    assert [round(math.log10(p.flops)) for p in profiles] == [18, 19, 20, 21]
    for p in profiles:
        assert p.n_opt == pytest.approx(TRUE.compute_optimal(p.flops)[0], rel=0.1)
    a, b = isoflop_exponents(profiles)
    assert a == pytest.approx(TRUE.exponent_n, abs=0.02) and a + b == pytest.approx(1.0, abs=1e-9)


def test_isoflop_needs_three_sizes_per_budget_and_two_budgets():
    n, d = [1e6, 2e6, 1e7, 2e7, 4e7], [1e9, 5e8, 1e9, 5e8, 2.5e8]
    with pytest.raises(ConfigError, match="two budgets"):
        isoflop_profiles(n, d, TRUE.loss(n, d).tolist())


# ---- the family and the training loop -------------------------------------------------------------------------
def test_family_models_count_like_the_estimators_and_transformers():
    from transformers import AutoModelForCausalLM

    cfg = family.transformer_config(48, 3)
    model = family.build("transformer", 48, 3)
    total = sum(p.numel() for p in model.parameters())
    assert total == estimators.param_count(cfg)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg.to_hf())
    assert total == sum(p.numel() for p in hf.parameters())
    assert family.non_embedding_params(model) == total - 4096 * 48
    lstm = family.build("lstm", 32, 2)
    assert family.non_embedding_params(lstm) == 2 * 4 * (32 * 32 * 2 + 2 * 32)        # W_ih, W_hh, two biases
    assert lstm(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 4096)


def test_family_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="multiple of 16"):
        family.transformer_config(40, 2)
    with pytest.raises(ConfigError, match="depth"):
        family.transformer_config(32, 0)
    with pytest.raises(ConfigError, match="kind"):
        family.build("rnn", 32, 2)
    with pytest.raises(ConfigError, match="tokens"):
        family.train_run("transformer", 16, 1, 0)
    with pytest.raises(ConfigError, match="seq"):
        family.Recipe(seq=1)
    with pytest.raises(ConfigError, match="min_steps|budget"):
        family.isoflop_plan([(16, 1)], [1.0])
    with pytest.raises(ConfigError, match="every budget"):
        family.isoflop_plan([(16, 1)], [-1e12])
    with pytest.raises(ConfigError, match="no runs of kind 'lstm'"):
        family.runs_arrays([{"kind": "transformer", "n_params": 1, "tokens": 1, "val_loss": 1.0}], kind="lstm")


def test_bundled_tokens_are_llmsys_tiny_ids():
    train, val = family.bundled_tokens()
    assert train.dtype == val.dtype == torch.int64
    assert len(train) == 1 << 20 and len(val) == 1 << 14
    assert int(train.max()) < 4096 and int(val.max()) < 4096 and int(train.min()) >= 0
    from transformers import AutoTokenizer

    from llmsys_lab.model import TINY_MODEL_PATH

    text = AutoTokenizer.from_pretrained(TINY_MODEL_PATH).decode(val[:200].tolist())
    assert text.count(" ") > 20 and "<|endoftext|>" in text                # English speeches, one per document


def test_more_tokens_and_a_wider_model_give_a_lower_loss():                # one thread: tests/conftest.py
    data = family.bundled_tokens()
    recipe = family.Recipe(val_windows=64)
    short = family.train_run("transformer", 16, 1, 2_048, recipe, data)
    long = family.train_run("transformer", 16, 1, 12_288, recipe, data)
    wide = family.train_run("transformer", 48, 1, 12_288, recipe, data)
    assert long.tokens == 12_288 and long.steps == 48 and long.flops == 6 * long.n_params * long.tokens
    assert math.log(4096) > short.val_loss > long.val_loss > wide.val_loss


def test_train_loop_memorises_and_works_with_a_transformers_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = torch.arange(40).repeat(20) % 37                                         # a repeating stream
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    loss_fn = lambda m, x: m(input_ids=x, labels=x).loss                         # noqa: E731
    before = evaluate(model, loss_fn, ids, 16, "cpu")
    res = train_loop(model, loss_fn, ids, steps=60, batch=8, seq=16, lr=1e-2, val_ids=ids, eval_every=20,
                     keep_best=True, log=None)
    assert [h["step"] for h in res.log] == [20, 40, 60]
    assert res.best_val_loss < 0.5 * before and res.best_val_loss == min(h["val_loss"] for h in res.log)
    kit = family.build("transformer", 16, 1)
    x = torch.randint(0, 4096, (2, 9))
    ref = torch.nn.functional.cross_entropy(kit(x)[:, :-1].reshape(-1, 4096), x[:, 1:].reshape(-1))
    assert torch.allclose(next_token_loss(kit, x), ref)


def test_train_loop_rejects_bad_arguments():
    model = family.build("transformer", 16, 1)
    ids = torch.arange(100)
    for kwargs, match in (({"steps": 0}, "steps"), ({"batch": 1.5}, "batch"), ({"seq": 1}, "seq"),
                          ({"lr": -1.0}, "lr"), ({"eval_every": 5}, "needs val_ids"),
                          ({"keep_best": True}, "keep_best")):
        args = {"steps": 2, "batch": 2, "seq": 8, "lr": 1e-3, "log": None, **kwargs}
        with pytest.raises(ConfigError, match=match):
            train_loop(model, next_token_loss, ids, **args)
    with pytest.raises(TypeError, match="train_ids"):
        train_loop(model, next_token_loss, ids.float(), steps=1, batch=1, seq=8, lr=1e-3)
    with pytest.raises(ConfigError, match="fewer than one window"):
        train_loop(model, next_token_loss, ids[:5], steps=1, batch=1, seq=8, lr=1e-3)


# ---- the explorer view ----------------------------------------------------------------------------------------
def test_scaling_view_prints_the_optimum_and_follows_its_slider():
    from llmsys_lab.viz.scaling_view import ScalingView

    view = ScalingView({"Chinchilla": CHINCHILLA, "synthetic": TRUE}, flops=5.76e23)
    n, d = CHINCHILLA.compute_optimal(5.76e23)
    text = view.text()
    assert text.startswith("budget C = 5.76e+23 FLOPs")
    assert f"N* = {n:.3g} params, D* = {d:.3g} tokens" in text and f"{CHINCHILLA.loss(n, d):.3f}" in text
    box = view.widget()
    assert "llmsys-scaling-view" in box._dom_classes
    view._slider.value = 10 ** 23.75                  # the slider snapping the budget set from code: no change
    assert view.flops == 5.76e23
    view._slider.value = 1e19
    assert view.flops == pytest.approx(1e19) and view.text().startswith("budget C = 1.00e+19")
    view.set_flops(5.76e23)
    assert view.text().startswith("budget C = 5.76e+23")
    assert view._image.value[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="range"):
        view.set_flops(1e30)
    with pytest.raises(TypeError, match="ChinchillaLaw"):
        ScalingView({"x": (1, 2)})
    with pytest.raises(ConfigError, match="non-empty"):
        ScalingView({})


# ---- the stored family -----------------------------------------------------------------------------------------
def test_stored_family_results_fit_a_law_with_positive_exponents():
    res = load_results("scaling_family")
    assert res["hardware"]["torch"] and "device" in res["hardware"]
    runs = res["runs"]
    kinds = {r["kind"] for r in runs}
    assert kinds == {"transformer", "lstm"} and res["total_seconds"] > 0
    for r in runs:
        assert r["flops"] == pytest.approx(6 * r["n_params"] * r["tokens"]) and 0 < r["val_loss"] < math.log(4096) + 1
    depth2 = [r for r in runs if r["kind"] == "transformer" and r["depth"] == 2]
    n, d, y = family.runs_arrays(depth2)
    fit = fit_chinchilla(n, d, y)
    assert fit.law.alpha > 0 and fit.law.beta > 0
    assert max(abs(fit.law.loss(a, b) / c - 1) for a, b, c in zip(n, d, y)) < 0.05
