"""The kit's model and generation against transformers, with and without the KV cache."""
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmsys_lab.configs import ModelConfig
from llmsys_lab.estimators import kv_bytes_per_token
from llmsys_lab.generate import generate, pad_left
from llmsys_lab.kv_cache import CacheError, KVCache
from llmsys_lab.model import TINY_MODEL_PATH, LlamaLM, model_card
from llmsys_lab.validate import ShapeError

TEXTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords, I pray you", "HAMLET.\nWhat"]


@pytest.fixture(scope="module")
def tiny(tiny):
    """tests/conftest.py's bundled model and tokenizer, with transformers' own load of the same checkpoint."""
    model, tok = tiny
    hf = AutoModelForCausalLM.from_pretrained(TINY_MODEL_PATH, dtype=torch.float32).eval()
    return model, tok, hf


def random_pair(num_kv_heads, seed=0):
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads, intermediate_size=96,
                      vocab_size=97, max_position_embeddings=128)
    hf_cfg = cfg.to_hf()
    hf_cfg.initializer_range = 0.2          # spread the logits: no near-ties for argmax to flip on
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    return LlamaLM.from_hf(hf), hf


def hf_generate(hf, prompts, n, **kw):
    ids, mask = pad_left(prompts, 0, "cpu")
    return hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=n, pad_token_id=0,
                       eos_token_id=kw.pop("eos", 0), **kw)


# ---- the bundled model ----------------------------------------------------------------------

def test_bundled_model_loads_with_transformers_and_matches_the_kit(tiny):
    model, tok, hf = tiny
    assert isinstance(AutoTokenizer.from_pretrained(TINY_MODEL_PATH).eos_token, str)
    ids = torch.tensor([tok(TEXTS[2]).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in model.parameters()) == 3_950_848
    assert (TINY_MODEL_PATH / "model.safetensors").stat().st_size < 10 * 2**20
    assert model_card()["best_val_loss"] < 4.5


def test_bundled_model_generation_equals_hf_generate(tiny):
    model, tok, hf = tiny
    prompts = [tok(t).input_ids for t in TEXTS]
    cached = generate(model, prompts, 40)
    uncached = generate(model, prompts, 40, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, hf_generate(hf, prompts, 40))
    assert all(n[-1] == tok.eos_token_id for n in cached.new_tokens)     # the model ends its speeches


# ---- random weights, MHA / GQA / MQA ----------------------------------------------------------

@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_random_models_match_transformers(kv_heads):
    model, hf = random_pair(kv_heads)
    ids = torch.randint(0, 97, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    prompts = [[5, 6, 7], [8] * 11, [1, 2, 3, 4, 5, 6, 7, 9]]
    cached = generate(model, prompts, 20, eos_token_id=None)
    assert torch.equal(cached.sequences, generate(model, prompts, 20, use_cache=False, eos_token_id=None).sequences)
    assert torch.equal(cached.sequences, hf_generate(hf, prompts, 20, eos=None))


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    model, tok, _ = tiny
    prompts = [tok(t).input_ids for t in TEXTS]
    batched = generate(model, prompts, 30).new_tokens
    assert batched == [generate(model, [p], 30).new_tokens[0] for p in prompts]


def test_sampling_is_identical_with_and_without_cache():
    model, _ = random_pair(2, seed=1)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    runs = [generate(model, prompts, 25, use_cache=c, do_sample=True, temperature=0.8, top_k=20,
                     generator=torch.Generator().manual_seed(7), eos_token_id=None).sequences for c in (True, False)]
    assert torch.equal(*runs)
    other = generate(model, prompts, 25, do_sample=True, generator=torch.Generator().manual_seed(8), eos_token_id=None)
    assert not torch.equal(runs[0], other.sequences)


def test_query_is_not_cached_the_new_token_needs_only_its_own_query(tiny):
    model, tok, _ = tiny
    ids = torch.tensor([tok(TEXTS[2]).input_ids])
    cache = KVCache.for_model(model.config, 1, 64)
    with torch.no_grad():
        model(ids[:, :-1], kv_cache=cache)                # prefill all but the last token
        last = model(ids[:, -1:], kv_cache=cache)         # decode: one query against cached K/V
        full = model(ids)                                 # recompute everything
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    assert cache.seq_len == ids.shape[1]


# ---- the cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,name", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_cache_bytes_per_token_match_the_estimator(dtype, name):
    cfg = LlamaLM.from_pretrained().config
    cache = KVCache.for_model(cfg, batch=3, max_len=100, dtype=dtype)
    assert cache.nbytes() == 3 * 100 * kv_bytes_per_token(cfg, name)
    k = torch.zeros(3, cfg.num_kv_heads, 7, cfg.head_dim, dtype=dtype)
    for layer in range(cfg.num_layers):
        cache.update(layer, k, k)
    assert cache.used_bytes() == 3 * 7 * kv_bytes_per_token(cfg, name)


def test_cache_errors():
    cache = KVCache(num_layers=1, batch=2, num_kv_heads=2, head_dim=4, max_len=5)
    k = torch.zeros(2, 2, 3, 4)
    cache.update(0, k, k)
    with pytest.raises(CacheError, match=r"the cache is full: 3 \+ 3 tokens > max_len = 5"):
        cache.update(0, k, k)
    with pytest.raises(CacheError, match="this cache holds 2 sequences but got a batch of 3"):
        cache.update(0, torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    with pytest.raises(CacheError, match="holds torch.float32 on cpu, got torch.float16"):
        cache.update(0, k[:, :, :1].half(), k[:, :, :1].half())
    with pytest.raises(ShapeError, match="k has 3 heads of size 4, the cache holds 2 heads of size 4"):
        cache.update(0, torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 4))
    with pytest.raises(CacheError, match="max_len must be a positive int"):
        KVCache(1, 1, 1, 4, 0)


# ---- bad input ------------------------------------------------------------------------------

def test_bad_generation_input(tiny):
    model, tok, _ = tiny
    with pytest.raises(ShapeError, match="prompt 0 has 500 tokens; with max_new_tokens = 20 it would need 520 "
                                         "positions, more than the model's context of 512"):
        generate(model, [[1] * 500], 20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 5)
    with pytest.raises(ValueError, match="no prompts given"):
        generate(model, [], 5)
    with pytest.raises(TypeError, match="prompts must be integer token ids, got torch.float32"):
        generate(model, torch.ones(1, 3), 5)
    with pytest.raises(ValueError, match=r"prompt 0, token 1: 5000 is outside 0..4095"):
        generate(model, [[1, 5000]], 5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, [[1]], 0)


def test_bad_forward_input(tiny):
    model, _, _ = tiny
    with pytest.raises(TypeError, match=r"input_ids must hold integer token ids \(int64\), got torch.float32"):
        model(torch.ones(1, 3))
    with pytest.raises(ValueError, match="input_ids are on meta but the model is on cpu"):
        model(torch.ones(1, 3, dtype=torch.long, device="meta"))
    with pytest.raises(ShapeError, match=r"input_ids must have shape \(batch, tokens\)"):
        model(torch.ones(3, dtype=torch.long))
    cache = KVCache.for_model(model.config, batch=2, max_len=16)
    with pytest.raises(CacheError, match="this cache holds 2 sequences but got a batch of 1"):
        model(torch.ones(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ShapeError, match="exceed the model's context of 512 tokens"):
        model(torch.ones(1, 513, dtype=torch.long))


@pytest.mark.parametrize("kw,err,msg", [
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int, got 2.5"),
    (dict(max_new_tokens="3"), TypeError, "max_new_tokens must be an int, got '3'"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int, got True"),
    (dict(do_sample=True, top_k=0), ValueError, "top_k must be None or an int >= 1, got 0"),
    (dict(do_sample=True, top_k=-1), ValueError, "top_k must be None or an int >= 1, got -1"),
    (dict(do_sample=True, top_k=2.0), ValueError, "top_k must be None or an int >= 1, got 2.0"),
])
def test_bad_generation_settings(tiny, kw, err, msg):
    model, _, _ = tiny
    kw = {"max_new_tokens": 3, **kw}
    with pytest.raises(err, match=msg):
        generate(model, [[1, 2]], **kw)


@pytest.mark.parametrize("prompt,msg", [
    ([1, 2.0], r"prompt 0, token 1: 2.0 is not an integer token id"),
    ([1, -3], r"prompt 0, token 1: -3 is outside 0..4095"),
    ([4096], r"prompt 0, token 0: 4096 is outside 0..4095"),
    ([np.float32(3)], r"prompt 0, token 0: (np.float32\(3.0\)|3.0) is not an integer token id"),
])
def test_bad_token_ids_are_named(tiny, prompt, msg):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=msg):
        generate(model, [prompt], 2)


def test_numpy_integer_ids_are_accepted_exactly(tiny):
    model, tok, _ = tiny
    p = tok(TEXTS[1]).input_ids
    want = generate(model, [p], 8).new_tokens
    assert generate(model, [np.array(p, dtype=np.int64)], 8).new_tokens == want
    assert generate(model, [[np.int32(t) for t in p]], 8).new_tokens == want
    assert generate(model, np.array([p]), 8).new_tokens == want
    assert generate(model, [np.int16(t) for t in p], 8).new_tokens == want       # one prompt of numpy ints
