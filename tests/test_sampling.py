"""llmsys_lab.sampling: greedy is exact, seeded sampling is reproducible whatever the batch, the draws
follow the exact distribution, and bad settings are refused with a message naming them."""

import pytest
import torch

from llmsys_lab.engine import Engine, serve
from llmsys_lab.generate import generate
from llmsys_lab.sampling import (SamplingBatch, SamplingError, SamplingParams, probs, sample, sample_rows,
                                 uniforms)
from llmsys_lab.speculative import Sampling


@pytest.fixture(scope="module")
def tiny():
    from llmsys_lab.model import load_tiny

    return load_tiny()


TEXTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords, I pray you", "HAMLET.\nWhat", "JULIET.\nO Romeo"]


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    return [tok(t).input_ids for t in TEXTS]


# ---- the transform and the draw ----------------------------------------------------------------
def test_greedy_rows_are_the_argmax_exactly():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=g)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1          # a tie: argmax takes the lower id
    mixed = [SamplingParams()] * 8 + [SamplingParams(temperature=1.0, seed=i) for i in range(8)]
    tok = sample(logits, SamplingBatch.build(mixed, list(range(16)), 300, "cpu"))
    assert torch.equal(tok[:8], logits[:8].argmax(-1))
    assert int(tok[3]) == 7


def test_top_k_1_is_greedy_at_any_temperature():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))
    logits[0, 4] = logits[0, 2] = 9.0
    for t in (0.5, 1.0, 3.0):
        tok = sample_rows(logits, SamplingParams(temperature=t, top_k=1, seed=5), list(range(64)))
        assert torch.equal(tok, logits.argmax(-1))


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    alone = [int(sample_rows(logits, p, i)[0]) for i in range(20)]
    others = torch.randn(7, 100, generator=torch.Generator().manual_seed(3))
    batch_logits = torch.cat([others[:3], logits, others[3:]])
    params = [SamplingParams(temperature=1.3, seed=s) for s in range(3)] + [p] + [SamplingParams()] * 4
    inside = [int(sample(batch_logits, SamplingBatch.build(params, [i] * 8, 100, "cpu"))[3]) for i in range(20)]
    assert alone == inside
    assert len(set(alone)) > 1                               # the counter moves the draw
    other_seed = [int(sample_rows(logits, SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=99), i)[0])
                  for i in range(20)]
    assert other_seed != alone


def test_uniforms_are_uniform():
    n = 200_000
    u = uniforms(torch.full((n,), 7, dtype=torch.int64), torch.arange(n))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    hist = torch.histc(u, bins=20, min=0, max=1)
    chi2 = float(((hist - n / 20) ** 2 / (n / 20)).sum())
    assert chi2 < 43.8                          # chi-square, 19 degrees of freedom, p = 0.001
    across = uniforms(torch.arange(n), torch.zeros(n, dtype=torch.int64))        # token 0 of many seeds
    hist = torch.histc(across, bins=20, min=0, max=1)
    assert float(((hist - n / 20) ** 2 / (n / 20)).sum()) < 43.8


CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}      # chi-square quantiles, p = 0.001


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, None, 1.0), (1.5, 5, 1.0),
                                                     (1.0, None, 0.8), (0.8, 6, 0.9)])
def test_draws_follow_the_exact_distribution(temperature, top_k, top_p):
    """Draw 40,000 tokens from a fixed 8-token distribution (one row per draw, distinct seeds) and compare
    the counts with the exact distribution, computed here from the definition in float64."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0])
    n = 40_000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s) for s in range(n)]
    tok = sample(logits.expand(n, 8), SamplingBatch.build(params, [0] * n, 8, "cpu"))
    counts = torch.bincount(tok, minlength=8).double()
    # the exact distribution: softmax(l / t); keep the k most likely and renormalise; then keep the
    # nucleus (the most likely tokens until their mass reaches top_p) and renormalise
    p = torch.softmax(logits.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    if top_k is not None:
        p = torch.zeros_like(p).index_copy_(0, order[:top_k], p[order[:top_k]])
        p = p / p.sum()
    keep = torch.zeros(8, dtype=torch.bool)
    mass = 0.0
    for rank, i in enumerate(order.tolist()):
        if (top_k is not None and rank >= top_k) or (rank > 0 and mass >= top_p):
            break
        keep[i] = True
        mass += float(p[i])
    exact = torch.where(keep, p, 0.0)
    exact = exact / exact.sum()
    assert torch.all(counts[~keep] == 0), "a token outside top-k / top-p was drawn"
    expected = exact[keep] * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < CHI2_999[dof], (chi2, counts.tolist(), expected.tolist())
    # and the dense form (speculative decoding's p) is the same distribution
    assert torch.allclose(probs(logits, temperature, top_k, top_p).double(), exact, atol=1e-6)
    assert torch.allclose(Sampling(True, temperature, top_k, top_p).probs(logits[None])[0].double(), exact, atol=1e-6)


def test_tiny_temperature_tends_to_the_argmax():
    logits = torch.tensor([[1000.0, 999.0, -1000.0]])
    assert int(sample_rows(logits, SamplingParams(temperature=1e-30, seed=0), 0)[0]) == 0
    assert torch.equal(probs(logits, 1e-30), torch.tensor([[1.0, 0.0, 0.0]]))


# ---- generate, speculative decoding and the engine use it ----------------------------------------
def test_engine_greedy_equals_generate_and_transformers(tiny, prompts):
    from transformers import AutoModelForCausalLM

    from llmsys_lab.model import TINY_MODEL_PATH

    model, _ = tiny
    prompts = prompts[:3]
    _, done = serve(model, prompts, 24, num_blocks=100, block_size=8, max_batch=2)
    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32).eval()
    for i, p in enumerate(prompts):
        assert done[i].output == generate(model, [p], 24).new_tokens[0]
        out = hf.generate(input_ids=torch.tensor([p]), max_new_tokens=24, pad_token_id=0, eos_token_id=0,
                          do_sample=False)
        assert done[i].output == out[0, len(p):].tolist()


@pytest.mark.parametrize("use_kernel", [False, True])
def test_engine_seeded_sampling_equals_generate_and_is_reproducible(tiny, prompts, use_kernel):
    """A seeded request gives the same tokens served alone by generate, or in a batch of the engine
    next to other sampled and greedy requests (and again)."""
    model, _ = tiny
    settings = [dict(temperature=0.8, top_p=0.9, seed=11), dict(temperature=1.2, top_k=20, seed=12),
                dict(temperature=1.0, seed=13), dict(), dict(temperature=0.6, top_k=5, top_p=0.7, seed=14)]
    n = 4 if use_kernel else 20              # the Triton interpreter runs the kernel on the CPU: keep it short
    if use_kernel:
        prompts, settings = prompts[:3], settings[:3]
    runs = []
    for _ in range(1 if use_kernel else 2):
        engine = Engine(model, num_blocks=60, block_size=16, max_batch=4, use_kernel=use_kernel)
        for i, (p, s) in enumerate(zip(prompts, settings)):
            engine.add_request(i, p, n, sampling=SamplingParams(max_tokens=n, **s) if s else None)
        runs.append({r.id: r.output for r in engine.run()})
        assert engine.blocks.num_free == engine.blocks.num_blocks
    assert runs[0] == runs[-1]
    for i, (p, s) in enumerate(zip(prompts, settings)):
        if s:
            alone = generate(model, [p], n, do_sample=True, temperature=s["temperature"], top_k=s.get("top_k"),
                             top_p=s.get("top_p", 1.0), seed=s["seed"]).new_tokens[0]
        else:
            alone = generate(model, [p], n).new_tokens[0]
        assert runs[0][i] == alone, i


def test_engine_stop_token_ids_end_a_request(tiny, prompts):
    model, _ = tiny
    ref = generate(model, [prompts[1]], 30, eos_token_id=None).new_tokens[0]
    stop = ref[5]
    engine = Engine(model, num_blocks=60, block_size=16, eos_token_id=None)
    engine.add_request("a", prompts[1], 30, sampling=SamplingParams(stop_token_ids=[stop], max_tokens=30))
    (r,) = list(engine.run())
    assert r.output == ref[:ref.index(stop) + 1]


def test_unseeded_requests_get_their_own_seed(tiny, prompts):
    model, _ = tiny
    engine = Engine(model, num_blocks=60, block_size=16, max_batch=4)
    reqs = [engine.add_request(i, prompts[0], 12, sampling=SamplingParams(temperature=1.5)) for i in range(4)]
    list(engine.run())
    assert len({r.sampling.seed for r in reqs}) == 4
    assert len({tuple(r.output) for r in reqs}) > 1


def test_engine_aborts_free_blocks(tiny, prompts):
    model, _ = tiny
    engine = Engine(model, num_blocks=40, block_size=4, max_batch=2)
    reqs = [engine.add_request(i, p, 30) for i, p in enumerate(prompts)]
    engine.step()
    assert engine.abort(reqs[0]) and engine.abort(reqs[4])          # one running, one waiting
    assert not engine.abort(reqs[0])
    done = list(engine.run())
    assert {r.id for r in done} == {1, 2, 3}
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert reqs[0].aborted and reqs[4].aborted and not reqs[1].aborted


# ---- bad settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,err,msg", [
    (dict(temperature=-0.1), SamplingError, "temperature must be >= 0"),
    (dict(temperature=float("nan")), SamplingError, "temperature must be a finite number"),
    (dict(temperature="1"), TypeError, "temperature must be a number"),
    (dict(top_p=0.0), SamplingError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), SamplingError, r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), SamplingError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(seed=-3), SamplingError, "seed must be an int >= 0"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(max_tokens=0), SamplingError, "max_tokens must be an int >= 1"),
    (dict(stop_token_ids=[1, "a"]), SamplingError, r"stop_token_ids\[1\]"),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids must be a list"),
    (dict(stop=["ok", ""]), SamplingError, r"stop\[1\] must be a non-empty string"),
    (dict(stop=3), TypeError, "stop must be a string or a list"),
])
def test_bad_params_are_refused(kw, err, msg):
    with pytest.raises(err, match=msg):
        SamplingParams(**kw)


def test_bad_settings_elsewhere_are_refused(tiny, prompts):
    model, _ = tiny
    with pytest.raises(TypeError, match="top_k"):
        Sampling(True, top_k=True)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(True, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [prompts[0]], 4, do_sample=True, top_p=2.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [prompts[0]], 4, do_sample=True, top_k=True)
    with pytest.raises(ValueError, match="seed"):
        generate(model, [prompts[0]], 4, do_sample=True, seed=-1)
    engine = Engine(model, num_blocks=20, block_size=16)
    with pytest.raises(SamplingError, match=r"stop_token_ids\[0\] = 99999 is outside the vocabulary"):
        engine.add_request("x", prompts[0], 4, sampling=SamplingParams(stop_token_ids=[99999]))
    with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
        engine.add_request("y", prompts[0], 4, sampling={"temperature": 1.0})
