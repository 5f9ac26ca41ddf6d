"""Speculative decoding: exact (greedy and sampled), rollback of both KV caches, the speed-up model.

Distribution tests use a chi-square goodness-of-fit test at significance 1e-3 with fixed seeds
(deterministic); each is paired with a negative control that the same test rejects, so the
check can fail.
"""
import random

import pytest
import torch

from llmsys_lab.configs import ModelConfig
from llmsys_lab.drafters import ModelDrafter, PromptLookupDrafter, load_draft, truncated_model
from llmsys_lab.generate import generate
from llmsys_lab.kv_cache import CacheError, KVCache
from llmsys_lab.model import LlamaLM
from llmsys_lab.paged import BlockError, BlockManager
from llmsys_lab.speculative import (ContiguousRunner, PagedRunner, Sampling, expected_speedup,
                                    expected_tokens_per_step, speculative_generate, verify)
from llmsys_lab.validate import ConfigError

SIGNIFICANCE = 1e-3


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of observed counts against probabilities (cells with
    expected count < 5 are pooled into one)."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.double), stat / 2))


# These models are tiny: one thread is fastest, and much faster on a busy shared CPU (tests/conftest.py's
# one_thread, for every test); `tiny` (the bundled model) and `greedy` (memoised references) come from there too.


def tiny_random_lm(seed: int, vocab: int = 6, layers: int = 1) -> LlamaLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(name=f"rand{seed}", hidden_size=16, num_layers=layers, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, vocab_size=vocab, max_position_embeddings=64)
    model = LlamaLM(cfg).eval()
    with torch.no_grad():                      # sharper distributions than the default init gives
        model.lm_head.weight.mul_(40)
    return model


# ---- the verify step on synthetic distributions (exact and cheap) ----------------------------------
def _first_token_counts(p, q, gamma, draws, seed, verifier=verify):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1])
    for _ in range(draws):
        draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(gamma)]
        n, nxt = verifier(draft, q, p, gen)
        counts[(draft[:n] + [nxt])[0]] += 1
    return counts


@pytest.mark.parametrize("sampling", [Sampling(True), Sampling(True, temperature=0.6, top_k=3)])
def test_verify_first_token_is_distributed_as_the_target(sampling):
    gen = torch.Generator().manual_seed(0)
    gamma, vocab = 3, 5
    p = sampling.probs(torch.randn(gamma + 1, vocab, generator=gen) * 2)
    q = sampling.probs(torch.randn(gamma, vocab, generator=gen) * 2)
    counts = _first_token_counts(p, q, gamma, 8000, seed=1)
    assert chi_square_p(counts, p[0]) > SIGNIFICANCE

    # negative control: accepting every draft token gives the draft's distribution, and the test sees it
    def accept_all(draft, q, p, gen):
        return len(draft), 0
    wrong = _first_token_counts(p, q, gamma, 8000, seed=1, verifier=accept_all)
    assert chi_square_p(wrong, p[0]) < SIGNIFICANCE


def test_verify_greedy_keeps_the_prefix_that_matches_the_argmax():
    p = Sampling().probs(torch.tensor([[0., 5, 1], [3, 0, 1], [0, 0, 9], [1, 2, 0]]))
    q = Sampling().probs(torch.tensor([[0., 5, 1], [3, 0, 1], [9, 0, 0]]))
    assert verify([1, 0, 0], q, p) == (2, 2)          # third draft token rejected, target's argmax instead
    assert verify([1, 0, 2], None, p) == (3, 1)       # all accepted, bonus token from the last row


def test_mean_tokens_per_step_matches_the_speedup_model():
    # every position: p and q overlap in sum min(p, q) = alpha, so the model's assumptions hold exactly
    alpha, gamma, vocab = 0.7, 4, 4
    p_row = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q_row = torch.tensor([0.2, 0.2, 0.2, 0.4])        # sum min = 0.2 + 0.2 + 0.2 + 0.1 = 0.7
    assert torch.minimum(p_row, q_row).sum().item() == pytest.approx(alpha)
    p, q = p_row.repeat(gamma + 1, 1), q_row.repeat(gamma, 1)
    gen = torch.Generator().manual_seed(3)
    total, draws = 0, 4000
    for _ in range(draws):
        draft = [int(torch.multinomial(q_row, 1, generator=gen)) for _ in range(gamma)]
        total += verify(draft, q, p, gen)[0] + 1
    expected = expected_tokens_per_step(alpha, gamma)
    assert expected == pytest.approx((1 - alpha ** 5) / (1 - alpha))
    assert abs(total / draws - expected) < 0.05 * expected


def test_speedup_formula_edges():
    assert expected_tokens_per_step(0.0, 5) == 1.0
    assert expected_tokens_per_step(1.0, 5) == 6.0
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx(expected_tokens_per_step(0.8, 4))
    assert expected_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)          # nothing accepted: pure loss


# ---- the full loop: sampled exactness on tiny random models (first two tokens) ----------------------
def _first_two(target, drafter, prompt, sampling, draws, seed):
    gen = torch.Generator().manual_seed(seed)
    vocab = target.config.vocab_size
    counts = torch.zeros(vocab, vocab)
    for _ in range(draws):
        out = speculative_generate(target, drafter, prompt, 2, gamma=2, sampling=sampling, generator=gen,
                                   eos_token_id=None)
        counts[out.new_tokens[0], out.new_tokens[1]] += 1
    return counts


@torch.no_grad()
def _target_first_two(target, prompt, sampling):
    vocab = target.config.vocab_size
    p1 = sampling.probs(target(torch.tensor([prompt]))[0, -1])
    seqs = torch.tensor([prompt + [t] for t in range(vocab)])
    p2 = sampling.probs(target(seqs)[:, -1])                          # (V, V): row = first token
    return p1[:, None] * p2


def test_speculative_sampling_first_two_tokens_match_the_target():
    sampling = Sampling(True, temperature=0.8, top_k=3)
    target, draft = tiny_random_lm(0, vocab=4), tiny_random_lm(1, vocab=4)
    prompt = [1, 2, 3]
    expected = _target_first_two(target, prompt, sampling)
    counts = _first_two(target, ModelDrafter(draft), prompt, sampling, 600, seed=0)
    assert chi_square_p(counts, expected) > SIGNIFICANCE
    # negative control: the draft's own distribution differs from the target's, and the test sees it
    assert chi_square_p(counts, _target_first_two(draft, prompt, sampling)) < SIGNIFICANCE


def test_speculative_sampling_on_the_real_model_first_two_tokens(tiny):
    """The speculative path itself on the bundled model: every run drafts (gamma = 2 tokens in its first
    step, so the first two output tokens come from verify: accepted drafts, a correction or the bonus),
    and the joint law of the first two tokens is the target's (chi-square over the top-k x top-k cells)."""
    model, tok = tiny
    sampling = Sampling(True, temperature=1.0, top_k=4)
    prompt = tok("KING.\nMy lords,").input_ids
    drafter = ModelDrafter(truncated_model(model, 2))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(model.config.vocab_size, model.config.vocab_size)
    drafted = accepted = rejections = first_step_drafts = 0
    runs = 150
    for _ in range(runs):
        out = speculative_generate(model, drafter, prompt, 3, gamma=2, sampling=sampling, generator=gen,
                                   eos_token_id=None)
        counts[out.new_tokens[0], out.new_tokens[1]] += 1
        drafted += out.stats.drafted
        accepted += out.stats.accepted
        rejections += out.stats.rejections
        first_step_drafts += len(out.steps[0].draft)
    assert first_step_drafts == 2 * runs                              # the first step always drafted gamma
    assert accepted > 0.05 * drafted and rejections > 0.05 * runs     # both verify outcomes were exercised
    with torch.no_grad():
        p1 = sampling.probs(model(torch.tensor([prompt]))[0, -1])
        first = p1.nonzero()[:, 0]
        p2 = sampling.probs(model(torch.tensor([prompt + [int(t)] for t in first]))[:, -1])   # (k, V)
    expected = torch.zeros_like(counts)
    expected[first] = p1[first, None] * p2
    assert chi_square_p(counts, expected) > SIGNIFICANCE
    assert counts[expected == 0].sum() == 0                           # never a pair outside the top-k
    # negative control: the drafter's own joint law differs from the target's, and the test sees it
    with torch.no_grad():
        d = drafter.model
        q1 = sampling.probs(d(torch.tensor([prompt]))[0, -1])
        q2 = sampling.probs(d(torch.tensor([prompt + [int(t)] for t in q1.nonzero()[:, 0]]))[:, -1])
    wrong = torch.zeros_like(counts)
    wrong[q1.nonzero()[:, 0]] = q1[q1.nonzero()[:, 0], None] * q2
    assert chi_square_p(counts, wrong) < SIGNIFICANCE


# ---- greedy: identical to target greedy decoding ---------------------------------------------------
PROMPTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords,", "HAMLET.\nWhat is", "JULIET.\nO Romeo, Romeo",
           "First Citizen.\nBefore we proceed", "LEAR.\nBlow, winds,", "PORTIA.\nThe quality of mercy"]


@pytest.fixture(scope="module")
def greedy_refs(tiny, greedy):
    model, tok = tiny
    prompts = [tok(p).input_ids for p in PROMPTS]
    return prompts, [greedy(model, p, 24, eos_token_id=None) for p in prompts]


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
@pytest.mark.parametrize("kind", ["model", "lookup"])
def test_greedy_speculative_equals_target_greedy(tiny, greedy_refs, cache, kind):
    model, _ = tiny
    prompts, refs = greedy_refs
    drafter = ModelDrafter(truncated_model(model, 3)) if kind == "model" else PromptLookupDrafter()
    accepted = 0
    for gamma in range(1, 9):
        i = (gamma + (kind == "lookup")) % len(prompts)
        out = speculative_generate(model, drafter, prompts[i], 24, gamma=gamma, cache=cache, eos_token_id=None,
                                   block_size=4)
        assert out.new_tokens == refs[i], f"gamma={gamma}, prompt {PROMPTS[i]!r}"
        assert out.stats.generated == 24
        accepted += out.stats.accepted
    assert accepted > 0                       # the drafts were really used, not all rejected


def test_greedy_with_eos_stops_like_generate(tiny):
    model, tok = tiny
    prompt = tok("ROMEO.\n").input_ids
    ref = generate(model, [prompt], max_new_tokens=60).new_tokens[0]
    out = speculative_generate(model, ModelDrafter(truncated_model(model, 2)), prompt, 60, gamma=5)
    assert out.new_tokens == ref and ref[-1] == 0


def test_trained_draft_model_if_present(tiny, greedy_refs):
    model, _ = tiny
    try:
        draft = load_draft()
    except FileNotFoundError:
        pytest.skip("llmsys-tiny-draft not trained yet (scripts/train_draft_model.py); the truncated drafter covers the loop")
    prompts, refs = greedy_refs
    out = speculative_generate(model, ModelDrafter(draft), prompts[0], 24, gamma=4, eos_token_id=None)
    assert out.new_tokens == refs[0]


# ---- rollback --------------------------------------------------------------------------------------
def test_contiguous_rollback_equals_a_cache_built_from_the_kept_tokens(tiny):
    model, _ = tiny
    rng = random.Random(0)
    tokens = [rng.randrange(1, 4096) for _ in range(60)]
    runner = ContiguousRunner(model, 80)
    kept = tokens[:5]
    runner.forward(kept)
    for _ in range(8):                          # draft k tokens, keep a random prefix of them
        k = rng.randint(1, 6)
        draft = [rng.randrange(1, 4096) for _ in range(k)]
        runner.forward(draft)
        n = rng.randint(0, k)
        runner.truncate(len(kept) + n)
        kept = kept + draft[:n]
    fresh = ContiguousRunner(model, 80)
    fresh.forward(kept)
    assert runner.tokens == kept and runner.cache.seq_len == len(kept)
    torch.testing.assert_close(runner.cache.k, fresh.cache.k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(runner.cache.v, fresh.cache.v, atol=1e-5, rtol=1e-4)


def assert_block_invariants(manager: BlockManager) -> None:
    """Every block is free, evictable or referenced, exactly as often as the tables reference it."""
    refs = [0] * manager.num_blocks
    for table in manager.tables.values():
        assert table.num_tokens == len(table.tokens) and len(table.cache_ids) == len(table.blocks)
        assert all(0 < f <= manager.block_size for f in table.filled)
        assert all(f == manager.block_size for f in table.filled[:-1])
        for b in table.blocks:
            refs[b] += 1
    free = list(manager.allocator.free_list)
    assert len(set(free)) == len(free)
    for b in range(manager.num_blocks):
        assert manager.allocator.refcount[b] == refs[b], f"block {b}"
        states = (b in free) + (b in manager.evictable) + (refs[b] > 0)
        assert states == 1, f"block {b} is in {states} states (free / evictable / in use)"
    assert set(manager.evictable) <= set(manager.block_key), "an evictable block is not in the prefix cache"
    assert {e.block for e in manager.cached.values()} == set(manager.block_key)


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_paged_rollback_frees_blocks_and_keeps_kv(tiny, block_size):
    model, _ = tiny
    rng = random.Random(block_size)
    runner = PagedRunner(model, 80, block_size=block_size)
    kept = [rng.randrange(1, 4096) for _ in range(5)]
    runner.forward(kept)
    freed_total = 0
    for _ in range(8):
        k = rng.randint(1, 7)
        draft = [rng.randrange(1, 4096) for _ in range(k)]
        runner.forward(draft)
        n = rng.randint(0, k)
        before = runner.manager.num_free
        freed = runner.truncate(len(kept) + n)
        kept = kept + draft[:n]
        assert runner.manager.num_free == before + len(freed)
        assert runner.manager.table(0).num_tokens == len(kept)
        assert len(runner.manager.table(0).blocks) == -(-len(kept) // block_size)
        assert_block_invariants(runner.manager)
        freed_total += len(freed)
    assert freed_total > 0
    fresh = PagedRunner(model, 80, block_size=block_size)
    fresh.forward(kept)
    for layer in range(model.config.num_layers):
        for a, b in zip(runner.cache.gather(layer, 0, len(kept)), fresh.cache.gather(layer, 0, len(kept))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    runner.release()
    assert runner.manager.num_free == runner.manager.num_blocks          # nothing leaked


def test_block_manager_truncate_with_shared_and_cached_blocks():
    m = BlockManager(12, 4, prefix_caching=True)
    m.add("a", list(range(10)))                                  # blocks: 4 + 4 + 2
    m.fork("a", "b")                                             # b shares all three
    freed = m.truncate("b", 3)                                   # b keeps part of the first (shared) block
    assert freed == [m.table("a").blocks[2], m.table("a").blocks[1]]
    assert_block_invariants(m)
    cow = m.append("b", 99)                                      # shared partial block: copied before writing
    assert cow is not None and cow.src == m.table("a").blocks[0]
    assert m.table("a").tokens == list(range(10)) and m.table("b").tokens == [0, 1, 2, 99]
    assert_block_invariants(m)
    m.free("a")
    m.free("b")
    assert_block_invariants(m)
    assert m.num_free == m.num_blocks
    m.add("c", list(range(8)))                                   # a full published block, not shared
    first = m.table("c").blocks[0]
    m.truncate("c", 2)
    assert first not in m.block_key                             # its tokens will change: unpublished
    m.append("c", 7)
    assert_block_invariants(m)


# ---- bad input --------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_clear_errors(tiny):
    model, tok = tiny
    prompt = tok("ROMEO.\n").input_ids
    lookup = PromptLookupDrafter()
    for gamma in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="gamma"):
            speculative_generate(model, lookup, prompt, 4, gamma=gamma)
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative_generate(model, ModelDrafter(tiny_random_lm(0)), prompt, 4)
    with pytest.raises(ValueError, match="cache must be"):
        speculative_generate(model, lookup, prompt, 4, cache="ring")
    with pytest.raises(TypeError, match="Sampling"):
        speculative_generate(model, lookup, prompt, 4, sampling="greedy")
    with pytest.raises(ValueError, match="temperature"):
        Sampling(True, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(True, top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, lookup, prompt, 0)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="num_layers"):
        truncated_model(model, 4)
    with pytest.raises(TypeError, match="LlamaLM"):
        ModelDrafter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"p must be \(gamma \+ 1"):
        verify([1, 2], None, torch.ones(2, 5) / 5)
    with pytest.raises(ValueError, match="probability 0"):
        verify([1], torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="alpha"):
        expected_speedup(1.5, 4, 0.1)
    cache = KVCache(1, 1, 1, 2, 8)
    with pytest.raises(CacheError, match="cannot truncate"):
        cache.truncate(1)
    m = BlockManager(4, 2)
    m.add(0, [1, 2, 3])
    with pytest.raises(BlockError, match="cannot truncate"):
        m.truncate(0, 4)
    with pytest.raises(BlockError, match="cannot truncate"):
        m.truncate(0, 0)
