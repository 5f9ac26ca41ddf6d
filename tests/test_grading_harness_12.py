"""Assignment 12 (DeepSeek-V3's latent cache and absorbed decode) graded by the trusted harness: the cache, the
absorbed attention and the MLA step run on inputs drawn per submission and are compared outside the sandbox with
float64 computations; the kit's absorbed_attention is stripped in the sandbox, the rest of its MLA reference code
(LatentKVCache, MLA.forward) is refused while the probe calls the answers, and decode calls are measured: the
notebook's own materialised helper gives the right numbers by the method the assignment rules out."""
from pathlib import Path

import nbformat
import pytest

from llmsys_lab.grading import harness
from harness_cases import grade_variants, variant
from test_grading_sandbox import needs_sandbox

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "12_deepseek_v3" / "deepseek_v3.ipynb"
STUB = ROOT / "assignments" / "12_deepseek_v3" / "deepseek_v3.ipynb"

ALT_CACHE = (   # lists of chunks, concatenated on every update
    "class LatentCache:\n"
    "    def __init__(self, num_layers):\n"
    "        self.parts = [([], []) for _ in range(num_layers)]\n"
    "    @property\n"
    "    def seq_len(self):\n"
    "        return sum(x.shape[1] for x in self.parts[-1][0])\n"
    "    def update(self, layer, latent, k_rope):\n"
    "        lats, krs = self.parts[layer]\n"
    "        lats.append(latent)\n"
    "        krs.append(k_rope)\n"
    "        return torch.cat(lats, dim=1), torch.cat(krs, dim=1)\n")
ALT_ABSORBED = (   # broadcasting matmuls instead of einsum, the mask by tril
    "def absorbed_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale):\n"
    "    q_lat = q_nope @ w_uk\n"
    "    lat = latent.unsqueeze(1)\n"
    "    scores = (q_lat @ lat.transpose(-1, -2) + q_rope @ k_rope.unsqueeze(1).transpose(-1, -2)) * scale\n"
    "    S, T = scores.shape[-2:]\n"
    "    mask = torch.ones(S, T, dtype=torch.bool).tril(T - S)\n"
    "    p = scores.masked_fill(~mask, float('-inf')).softmax(-1)\n"
    "    return (p @ lat) @ w_uv.transpose(-1, -2)\n")
ALT_STEP = (   # positions from seq_len, heads merged by permute/flatten
    "def mla_step(mla, x, cache, layer=0):\n"
    "    c = mla.config\n"
    "    start = cache.seq_len\n"
    "    cos, sin = rope_cos_sin(torch.arange(start, start + x.shape[1]), c.qk_rope_head_dim, c.rope_theta)\n"
    "    q_nope, q_rope = mla.queries(x, cos, sin)\n"
    "    lat, kr = cache.update(layer, *mla.latents(x, cos, sin))\n"
    "    w_uk, w_uv = mla.up_weights()\n"
    "    o = absorbed_attention(q_nope, q_rope, lat, kr, w_uk, w_uv, mla.scale)\n"
    "    return mla.o_proj(o.permute(0, 2, 1, 3).flatten(2))\n")
MATERIALISED = (   # the notebook's own helper: right numbers, per-head K and V built
    "def absorbed_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale):\n"
    "    return materialised(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale)\n")
KIT_CACHE = (   # the kit's LatentKVCache behind the notebook's name
    "from llmsys_lab.deepseek.mla import LatentKVCache as _Kit\n"
    "class LatentCache:\n"
    "    def __init__(self, num_layers):\n"
    "        self.n, self.kit = num_layers, None\n"
    "    def length(self, layer):\n"
    "        return 0 if self.kit is None else self.kit.length(layer)\n"
    "    @property\n"
    "    def seq_len(self):\n"
    "        return 0 if self.kit is None else self.kit.seq_len\n"
    "    def update(self, layer, latent, k_rope):\n"
    "        if self.kit is None:\n"
    "            self.kit = _Kit(self.n, latent.shape[0], latent.shape[2], k_rope.shape[2], 64)\n"
    "        return self.kit.update(layer, latent, k_rope)\n")
KIT_ABSORBED = "from llmsys_lab.deepseek.mla import absorbed_attention\n"
KIT_STEP = (   # the kit's forward, captured before the test cell refuses it
    "_forward = MLA.forward\n"
    "def mla_step(mla, x, cache, layer=0):\n"
    "    return _forward(mla, x, cache, layer)\n")


CASES = {   # name -> (notebook, score it deserves)
    "solution": (lambda: variant(SOLUTION, {}), 10),
    "stub": (lambda: variant(STUB, {}), 0),
    "forged": (lambda: variant(STUB, {}, forge=True), 0),
    "borrowed": (lambda: variant(SOLUTION, {"latent_cache": KIT_CACHE, "absorbed": KIT_ABSORBED,
                                             "mla_step": KIT_STEP}, forge=True), 0),
    "materialised": (lambda: variant(SOLUTION, {"absorbed": MATERIALISED}), 6),
    "alternative": (lambda: variant(SOLUTION, {"latent_cache": ALT_CACHE, "absorbed": ALT_ABSORBED,
                                                "mla_step": ALT_STEP}), 10),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("harness12")
    return grade_variants(folder, {name: make() for name, (make, _) in CASES.items()})


@needs_sandbox
@pytest.mark.parametrize("name", list(CASES))
def test_assignment_12_scores_what_each_submission_deserves(graded, name):
    sub = graded[name]
    detail = [(t.test, t.points, t.feedback) for t in sub.tests]
    assert sub.error is None, sub.error
    assert (sub.score, sub.max_score) == (CASES[name][1], 10), detail
    tests = {t.test: t.feedback for t in sub.tests}
    if name in ("forged", "borrowed"):      # every in-kernel verdict was forged: the harness took the points
        assert all(f.startswith("the grader's own check of your outputs failed") for f in tests.values()), detail
    if name == "borrowed":
        assert "of llmsys_lab/deepseek/mla.py" in tests["test_cache"], detail
        assert "absorbed_attention is not available while this assignment is graded" in tests["test_absorbed"], detail
        assert "forward of llmsys_lab/deepseek/mla.py" in tests["test_mla_step"], detail
    if name == "materialised":              # its in-kernel test passes (the helper equals itself); the method does not
        assert tests["test_absorbed"].startswith("the grader's own check of your outputs failed"), detail
        assert "never builds them" in tests["test_absorbed"], detail


def test_the_stripped_mla_module_keeps_the_pieces_mla_step_may_use(tmp_path):
    import importlib.util
    import sys

    import torch

    [(original, copy)] = harness.stripped_modules(harness.SPECS["12_deepseek_v3"], tmp_path).items()
    assert Path(original).name == "mla.py"
    spec = importlib.util.spec_from_file_location("llmsys_lab.deepseek._stripped_mla", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        cfg = module.MLAConfig(hidden_size=32, num_heads=2, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4,
                               qk_rope_head_dim=4, v_head_dim=4)
        assert module.MLA(cfg)(torch.randn(1, 3, 32)).shape == (1, 3, 32)     # the materialised path still runs
        with pytest.raises(RuntimeError, match="absorbed_attention is not available"):
            module.absorbed_attention(*[None] * 7)
    finally:
        del sys.modules[spec.name]


def test_the_absorbed_judge_refuses_wrong_numbers_and_the_materialised_method():
    import torch

    spec = harness.SPECS["12_deepseek_v3"]
    calls, tensors = spec.calls(torch.Generator().manual_seed(0))
    inputs = {**tensors, "__calls__": calls}
    from llmsys_lab.grading.judges.a12 import _materialised

    def outputs(largest, factor=1.0):
        out = {}
        for call in calls:
            if call.fn == "absorbed_attention":
                want = _materialised(*[tensors[a] for a in call.args[:6]], call.args[6]).float().double()
                out[call.id] = torch.cat([want.reshape(-1) * factor, torch.tensor([float(largest)], dtype=torch.float64)])
        return out

    assert spec.judge["test_absorbed"](inputs, outputs(0), {}) is None
    assert "max abs error" in spec.judge["test_absorbed"](inputs, outputs(0, 1.001), {})
    assert "never builds them" in spec.judge["test_absorbed"](inputs, outputs(10 ** 6), {})


def test_every_graded_test_of_assignment_12_has_a_judge():
    nb = nbformat.read(next((ROOT / "solutions" / "12_deepseek_v3").glob("*.ipynb")), as_version=4)
    graded_ids = {c.metadata["nbgrader"]["grade_id"] for c in nb.cells
                  if c.metadata.get("nbgrader", {}).get("grade") and c.metadata["nbgrader"].get("points")}
    assert graded_ids and graded_ids == set(harness.SPECS["12_deepseek_v3"].judge)
