"""Assignment 03 (KV cache) graded by the harness: the student's KVCache driven through a scripted list of updates
drawn per submission, generate_cached run on drawn prompts with a fresh copy of the tiny model whose calls are
recorded; caches, tokens and calls are judged outside the sandbox."""
from pathlib import Path

import pytest
import torch

from llmsys_lab.grading import harness
from harness_cases import (assert_full_marks_and_zero, assert_the_harness_took_every_point, grade_variants,
                           scores, variant)
from test_grading_sandbox import needs_sandbox

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "03_kv_cache" / "kv_cache.ipynb"
STUDENT = ROOT / "assignments" / "03_kv_cache" / "kv_cache.ipynb"
SPEC = harness.SPECS["03_kv_cache"]

KIT_CACHE = {   # right tokens and calls, with the kit's cache (in-kernel verdicts forged)
    "generate_cached": ("from llmsys_lab.kv_cache import KVCache as _KitCache\n"
                        "@torch.no_grad()\n"
                        "def generate_cached(model, input_ids, max_new_tokens):\n"
                        "    B, T = input_ids.shape\n"
                        "    cache = _KitCache.for_model(model.config, B, T + max_new_tokens)\n"
                        "    logits, ids = model(input_ids, kv_cache=cache), input_ids\n"
                        "    for step in range(max_new_tokens):\n"
                        "        ids = torch.cat([ids, logits[:, -1].argmax(-1)[:, None]], 1)\n"
                        "        if step + 1 < max_new_tokens:\n"
                        "            logits = model(ids[:, -1:], kv_cache=cache)\n"
                        "    return ids\n"),
}
NO_CACHE = {"generate_cached": "generate_cached = generate_no_cache\n"}   # right tokens, the whole sequence each step
ALTERNATIVE = {   # written another way: chunks kept in lists and joined on demand; the prefill inside the loop
    "kv_cache": ("class KVCache:\n"
                 "    def __init__(self, num_layers):\n"
                 "        self.chunks = [([], []) for _ in range(num_layers)]\n"
                 "    @property\n"
                 "    def seq_len(self):\n"
                 "        return sum(k.shape[2] for k in self.chunks[0][0])\n"
                 "    def update(self, layer, k, v):\n"
                 "        ks, vs = self.chunks[layer]\n"
                 "        ks.append(k), vs.append(v)\n"
                 "        return torch.cat(ks, 2), torch.cat(vs, 2)\n"
                 "    def check_batch(self, batch):\n"
                 "        pass\n"),
    "generate_cached": ("@torch.no_grad()\n"
                        "def generate_cached(model, input_ids, max_new_tokens):\n"
                        "    cache, feed, out = KVCache(model.config.num_layers), input_ids, [input_ids]\n"
                        "    for _ in range(max_new_tokens):\n"
                        "        feed = model(feed, kv_cache=cache)[:, -1:].argmax(-1)\n"
                        "        out.append(feed)\n"
                        "    return torch.cat(out, 1)\n"),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness03")
    books = {"solution": variant(SOLUTION), "stub": variant(STUDENT), "forged": variant(STUDENT, forge=True),
             "kit_cache": variant(SOLUTION, KIT_CACHE, forge=True), "no_cache": variant(SOLUTION, NO_CACHE),
             "alternative": variant(SOLUTION, ALTERNATIVE)}
    return grade_variants(folder, books)


@needs_sandbox
def test_the_solution_scores_full_marks_and_the_stub_zero(graded):
    assert_full_marks_and_zero(graded, SPEC)


@needs_sandbox
def test_an_unanswered_notebook_that_forges_every_in_kernel_verdict_scores_zero(graded):
    assert_the_harness_took_every_point(graded["forged"])


@needs_sandbox
def test_generation_with_the_kits_cache_scores_zero(graded):
    got = scores(graded["kit_cache"])
    for test in ("test_generate_equal", "test_decode_steps"):
        assert got[test][0] == 0, got
        assert "a reference implementation this exercise asks you to write yourself" in got[test][1], got[test]
    assert got["test_cache"][0] == 3, got


@needs_sandbox
def test_decoding_without_the_cache_loses_the_decode_steps_points(graded):
    got = scores(graded["no_cache"])
    assert got["test_generate_equal"][0] == 4 and got["test_decode_steps"][0] == 0, got


def test_the_judges_accept_the_right_answers_and_refuse_wrong_ones():
    from llmsys_lab.grading.judges import a03
    from llmsys_lab.grading.drivers import a03 as drivers

    calls, tensors = SPEC.calls(torch.Generator().manual_seed(3))
    inputs = {**tensors, "__calls__": calls}

    class Cache:
        def __init__(self, num_layers):
            self.k, self.v = [None] * num_layers, [None] * num_layers

        @property
        def seq_len(self):
            return 0 if self.k[-1] is None else self.k[-1].shape[2]

        def update(self, layer, k, v):
            self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], 2)
            self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], 2)
            return self.k[layer], self.v[layer]

        def check_batch(self, batch):
            pass

    @torch.no_grad()
    def generate(model, ids, n):
        cache = Cache(model.config.num_layers)
        logits = model(ids, kv_cache=cache)
        for step in range(n):
            ids = torch.cat([ids, logits[:, -1].argmax(-1)[:, None]], 1)
            if step + 1 < n:
                logits = model(ids[:, -1:], kv_cache=cache)
        return ids

    right = {}
    for call in calls:
        if call.fn == "KVCache":
            right[call.id] = drivers.drive_cache(Cache, "KVCache", {})(
                call.args[0], [tensors[n] for n in call.args[1]["tuple"]], [tensors[n] for n in call.args[2]["tuple"]])
        else:
            right[f"{call.id}#0"], right[f"{call.id}#1"] = drivers.drive_generate(generate, "g", {})(
                tensors[call.args[0]], call.args[1])
    assert {t: j(inputs, right, {}) for t, j in SPEC.judge.items()} == dict.fromkeys(SPEC.judge)
    wrong = dict(right)
    first = next(c for c in calls if c.fn == "generate_cached")
    ids = right[f"{first.id}#0"].clone()
    ids[0, -1] = (ids[0, -1] + 1) % a03._model().config.vocab_size
    wrong[f"{first.id}#0"] = ids
    assert "greedy decoding chooses" in SPEC.judge["test_generate_equal"](inputs, wrong, {})
    wrong = dict(right)
    wrong["cache/0"] = right["cache/0"].clone()
    wrong["cache/0"][1] += 1
    assert "not everything cached" in SPEC.judge["test_cache"](inputs, wrong, {})
    # decoding without the cache: the right tokens, every call with the whole sequence and no cache
    n, length = first.args[1], tensors[first.args[0]].shape[1]
    wrong = dict(right)
    wrong[f"{first.id}#1"] = torch.tensor([[n, -1]] + [[length + i, -1] for i in range(n)])
    assert "empty cache" in SPEC.judge["test_decode_steps"](inputs, wrong, {})
    assert SPEC.judge["test_generate_equal"](inputs, wrong, {}) is None
