"""Static-cache decoding (llmsys_lab.static_decode): the model's own forward, fixed shapes, no graph break.

The static path must be the model: the same tokens as the padded KVCache path and transformers'
generate (which tests/test_generate.py checks the KVCache path against), the same logits as a full
forward, one traced graph for every decode step (a host sync or an untraceable operation would break
it; a value that changes per step would recompile it), and clear errors for every misuse."""
import pytest
import torch

from llmsys_lab.errors import LabError
from llmsys_lab.generate import generate
from llmsys_lab.kv_cache import StaticKVCache
from llmsys_lab.plain_decode import PlainDecode
from llmsys_lab.static_decode import StaticDecoder, compiled_step

PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47]]      # left padding of 3 and 6


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


def test_static_cache_generates_the_dynamic_caches_tokens(model):
    want = generate(model, PROMPTS, 16, eos_token_id=None)
    got = generate(model, PROMPTS, 16, eos_token_id=None, static_cache=True)
    assert got.new_tokens == want.new_tokens
    assert torch.equal(got.sequences, want.sequences)
    assert isinstance(got.cache, StaticKVCache) and got.stats.compile_seconds == 0.0


def test_static_cache_samples_the_dynamic_caches_tokens_with_a_seed(model):
    kw = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=7, eos_token_id=None)
    assert generate(model, PROMPTS, 12, static_cache=True, **kw).new_tokens == generate(model, PROMPTS, 12, **kw).new_tokens


def test_every_step_gives_the_full_forwards_logits(model):
    ids = torch.tensor([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]])
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    dec = StaticDecoder(model, 2, 9)
    with torch.no_grad():
        logits = dec.prefill(ids, mask)
        for _ in range(4):
            full = model(ids, attention_mask=mask)[:, -1]
            torch.testing.assert_close(logits, full, atol=2e-5, rtol=1e-4)
            nxt = logits.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
            logits = dec.decode(nxt)
    assert dec.next_col == 9 and int(dec.cache.cols) == 9        # the column advanced on the device too


def test_a_padding_query_gets_a_finite_output(model):
    """A left-padding column sees no real key; it must still attend to something (itself), or SDPA's NaN
    row would flow into the next layer's K/V and from there into every real token's attention."""
    dec = StaticDecoder(model, 2, 12)
    ids = torch.tensor([[0] * 6 + [5], [1, 2, 3, 4, 5, 6, 7]])
    mask = ids != 0
    mask[1] = True
    with torch.no_grad():
        out = dec.prefill(ids, mask)
    assert torch.isfinite(out).all() and torch.isfinite(dec.cache.k).all() and torch.isfinite(dec.cache.v).all()


def _graphs_and_frames():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["frames"].values())


def test_the_decode_step_is_one_graph_compiled_once(model):
    """fullgraph=True turns any graph break into an error; the counters show one trace for all steps (the
    column and the positions are device tensors, so nothing the trace depends on changes per step)."""
    import torch._dynamo

    torch._dynamo.reset()
    dec = StaticDecoder(model, 3, 20, compile="eager")
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8], [0, 1, 2, 3]])
    with torch.no_grad():
        tok = dec.prefill(ids, ids != 0).argmax(-1)
        graphs_before, _ = _graphs_and_frames()
        for _ in range(6):
            tok = dec.decode(tok).argmax(-1)
    graphs_after, _ = _graphs_and_frames()
    assert graphs_after - graphs_before == 1
    assert dec.compile_seconds > 0
    eager = generate(model, ids.tolist(), 7, eos_token_id=None)
    assert generate(model, ids.tolist(), 7, eos_token_id=None, compile="eager").new_tokens == eager.new_tokens


def test_a_host_sync_in_the_step_is_a_graph_break_error(model):
    """What the fullgraph check catches: the same step with a host read of a device value fails to trace."""
    import torch._dynamo

    torch._dynamo.reset()
    dec = StaticDecoder(model, 1, 8, compile="eager")
    real_step = dec._eager_step

    def syncing_step():
        if int(dec.cache.cols) > 100:          # reads the column on the host
            raise AssertionError
        return real_step()

    dec._step = compiled_step(syncing_step, "eager")
    with torch.no_grad():
        tok = dec.prefill(torch.tensor([[3, 4]])).argmax(-1)
        with pytest.raises(Exception, match="(?i)graph break|data-dependent|Unsupported|item"):
            dec.decode(tok)


def test_plain_decode_compiles_as_one_graph_and_matches_eager(model):
    import torch._dynamo

    torch._dynamo.reset()
    eager, traced = PlainDecode(model, 2, 12), PlainDecode(model, 2, 12, compile="eager")
    for p in (eager, traced):
        p.fill_random(5, torch.Generator().manual_seed(0))
        p.tokens.copy_(torch.tensor([3, 9]))
    before, _ = _graphs_and_frames()
    for _ in range(4):
        torch.testing.assert_close(traced.step(), eager.step())
        eager.positions.add_(1)
        traced.positions.add_(1)
    assert _graphs_and_frames()[0] - before == 1


def test_misuse_gets_clear_errors(model):
    dec = StaticDecoder(model, 2, 6)
    with pytest.raises(LabError, match="before prefill"):
        dec.decode(torch.tensor([1, 2]))
    with pytest.raises(LabError, match="holds 2 sequences but got a batch of 3"):
        dec.prefill(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(LabError, match="leaves no column"):
        dec.prefill(torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must be in"):
        dec.prefill(torch.full((2, 2), model.config.vocab_size))
    with pytest.raises(Exception, match="attention_mask must have the prompts' shape"):
        dec.prefill(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with torch.no_grad():
        dec.prefill(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(Exception, match=r"one token id per sequence, shape \(2,\)"):
        dec.decode(torch.tensor([[1, 2]]))
    dec.decode(torch.tensor([1, 2]))
    dec.decode(torch.tensor([1, 2]))
    with pytest.raises(LabError, match="static cache is full: 6 columns"):
        dec.decode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        StaticDecoder(model, 1, 4, cuda_graph=True)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        StaticDecoder(model, 1, model.config.max_position_embeddings + 1)
    with pytest.raises(LabError, match="batch must be an int >= 1, got 0"):
        StaticDecoder(model, 0, 4)
    for bad in (True, 2.0):
        with pytest.raises(TypeError, match="batch must be an int"):
            StaticDecoder(model, bad, 4)
    with pytest.raises(TypeError, match="compile must be a bool or a TorchDynamo backend name"):
        StaticDecoder(model, 1, 4, compile=1)
    with pytest.raises(ValueError, match="need use_cache=True"):
        generate(model, PROMPTS, 2, use_cache=False, static_cache=True)
    with pytest.raises(ValueError, match="carries its own positions and masks: pass no attention_mask"):
        model(torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 5), kv_cache=dec.cache)
    cache = StaticKVCache.for_model(model.config, 2, 8)
    with pytest.raises(Exception, match=r"2 new tokens but the cache's positions are \(2, 1\)"):
        model(torch.ones(2, 2, dtype=torch.long), kv_cache=cache)
    with pytest.raises(LabError, match="max_len must be a positive int"):
        StaticKVCache(1, 1, 1, 2, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor's Triton kernels, CUDA graphs)")
def test_compiled_and_graphed_decode_gives_the_eager_tokens_on_the_gpu(model):
    import copy

    gpu = copy.deepcopy(model).cuda()
    want = generate(gpu, PROMPTS, 24, eos_token_id=None)
    for kw in (dict(static_cache=True, cuda_graph=False), dict(static_cache=True), dict(compile=True)):
        got = generate(gpu, PROMPTS, 24, eos_token_id=None, **kw)
        assert got.new_tokens == want.new_tokens, kw
    assert got.stats.compile_seconds > 0
    plain_eager, plain_compiled = PlainDecode(gpu, 4, 64), PlainDecode(gpu, 4, 64, compile=True)
    for p in (plain_eager, plain_compiled):
        p.fill_random(30, torch.Generator(device="cuda").manual_seed(0))
        p.tokens.fill_(7)
    torch.testing.assert_close(plain_compiled.step(), plain_eager.step(), atol=1e-4, rtol=1e-4)


# ---- speculative decoding on the static runner -------------------------------------------------------------

def test_speculative_decoding_on_the_static_runner_gives_the_contiguous_runners_tokens(model):
    from llmsys_lab.drafters import ModelDrafter, load_draft
    from llmsys_lab.speculative import Sampling, speculative_generate

    draft = load_draft()
    prompt = [41, 481, 259, 1743, 12]
    for kw in (dict(), dict(sampling=Sampling(do_sample=True, temperature=0.8))):
        outs = [speculative_generate(model, ModelDrafter(draft, cache=c), prompt, 30, gamma=3, cache=c,
                                     eos_token_id=None, generator=torch.Generator().manual_seed(3), **kw)
                for c in ("contiguous", "static")]
        assert outs[0].new_tokens == outs[1].new_tokens
        assert outs[0].stats.accepted == outs[1].stats.accepted and outs[1].stats.rejections > 0


def test_the_static_runner_traces_one_graph_per_forward_length_and_rolls_back_for_free(model):
    import torch._dynamo

    from llmsys_lab.speculative import ContiguousRunner
    from llmsys_lab.static_decode import StaticRunner

    torch._dynamo.reset()
    ref, run = ContiguousRunner(model, 24), StaticRunner(model, 24, compile="eager", graph_tokens=4)
    before = _graphs_and_frames()[0]
    steps = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [15], [16], [17, 18, 19, 20]]
    for i, new in enumerate(steps):
        torch.testing.assert_close(run.forward(new), ref.forward(new), atol=2e-5, rtol=1e-4)
        if i == 1:                                   # reject two drafts: forget them, then write over them
            ref.truncate(8)
            run.truncate(8)
    assert run.tokens == ref.tokens
    assert _graphs_and_frames()[0] - before == 2     # T = 4 and T = 1; the 6-token prompt ran eagerly
    assert run.compile_seconds > 0
    with pytest.raises(LabError, match="cannot truncate to 99 tokens"):
        run.truncate(99)
    with pytest.raises(LabError, match="static cache is full"):
        run.forward(list(range(1, 20)))
    with pytest.raises(ValueError, match="at least one new token"):
        run.forward([])


def test_runner_caches_are_named_in_the_errors(model):
    from llmsys_lab.drafters import ModelDrafter
    from llmsys_lab.speculative import make_runner

    with pytest.raises(ValueError, match="'contiguous', 'paged', 'static', got 'fast'"):
        make_runner(model, 8, "fast")
    with pytest.raises(ValueError, match="'contiguous', 'paged', 'static', got 'fast'"):
        ModelDrafter(model, cache="fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor's Triton kernels, CUDA graphs)")
def test_speculative_decoding_compiled_and_graphed_gives_the_eager_tokens_on_the_gpu(model):
    import copy

    from llmsys_lab.drafters import ModelDrafter, load_draft
    from llmsys_lab.speculative import speculative_generate

    gpu, draft = copy.deepcopy(model).cuda(), load_draft(device="cuda")
    prompt = [41, 481, 259, 1743, 12]
    want = speculative_generate(gpu, ModelDrafter(draft), prompt, 40, gamma=4, eos_token_id=None)
    got = speculative_generate(gpu, ModelDrafter(draft, cache="static"), prompt, 40, gamma=4, cache="static",
                               eos_token_id=None)
    assert got.new_tokens == want.new_tokens
