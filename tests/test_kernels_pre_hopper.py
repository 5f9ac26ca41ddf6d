"""The kernels' pre-Hopper paths, forced on a large GPU (LLMSYS_FORCE_ARCH): what a Colab T4 runs.

A T4 (compute capability 7.5) has no TMA and no bf16 units. LLMSYS_FORCE_ARCH=sm75 makes the kit's
capability checks (llmsys_lab._runtime.gpu_capability) answer 7.5, so on an H200 the kernels take
the T4's paths: FlashAttention without tensor-memory descriptors, fp16 accepted, bf16 refused with
the dtype to use instead. (Triton still compiles for the real GPU: the instruction selection of a
T4 itself, tl.dot without tensor cores, is not reproduced.) Skipped without CUDA; run on a GPU with
`LLMSYS_REQUIRE_GPU=1 python -m pytest -p no:cacheprovider tests/test_kernels_pre_hopper.py`.
"""
import pytest
import torch

from llmsys_lab._runtime import gpu_capability, half_dtype
from llmsys_lab.kernels.flash_attention import _can_use_tma, flash_attention
from llmsys_lab.kernels.paged_attention import paged_attention_decode, paged_attention_reference
from test_kernels_flash_attention import assert_within_rule, make
from test_kernels_paged_attention import TOL
from test_kernels_paged_attention import make as make_paged

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs the compiled kernels)")]


@pytest.fixture(params=["sm75", "sm80"])
def arch(request, monkeypatch):
    monkeypatch.setenv("LLMSYS_FORCE_ARCH", request.param)
    return request.param


def test_forced_arch_lowers_the_capability_and_turns_tma_off(arch):
    real = torch.cuda.get_device_capability()
    want = {"sm75": (7, 5), "sm80": (8, 0)}[arch]
    assert gpu_capability() == min(real, want)
    q = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.float16)
    assert not _can_use_tma(q, q, q, torch.empty_like(q))
    assert half_dtype("cuda") == (torch.float16 if arch == "sm75" else torch.bfloat16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", [(2, 8, 2, 1000, 1000, 128), (1, 8, 8, 512, 512, 64), (1, 4, 2, 333, 700, 96)],
                         ids=lambda c: "x".join(map(str, c)))
def test_flash_attention_fp16_on_the_pre_hopper_path(monkeypatch, case, causal):
    monkeypatch.setenv("LLMSYS_FORCE_ARCH", "sm75")
    q, k, v, do = make("cuda", torch.float16, *case)
    assert_within_rule(q, k, v, do, causal)          # forward and the three gradients vs float64


@pytest.mark.parametrize("h,h_kv,d,block_size,lens", [(8, 2, 128, 16, [300, 1, 77]), (4, 4, 64, 8, [40, 17])])
def test_paged_decode_fp16_on_the_pre_hopper_path(monkeypatch, h, h_kv, d, block_size, lens):
    monkeypatch.setenv("LLMSYS_FORCE_ARCH", "sm75")
    args = make_paged("cuda", torch.float16, len(lens), h, h_kv, d, block_size, lens)
    torch.testing.assert_close(paged_attention_decode(*args), paged_attention_reference(*args),
                               atol=TOL[torch.float16], rtol=TOL[torch.float16])


def test_bf16_is_refused_below_ampere_and_accepted_from_it(arch):
    q, k, v, _ = make("cuda", torch.bfloat16, 1, 2, 2, 64, 64, 64)
    args = make_paged("cuda", torch.bfloat16, 2, 4, 2, 64, 8, [9, 20])
    if arch == "sm75":
        with pytest.raises(TypeError, match=r"bfloat16 needs a GPU of compute capability >= 8.0, this one is 7.5"):
            flash_attention(q, k, v)
        with pytest.raises(TypeError, match="use float16"):
            paged_attention_decode(*args)
    else:
        assert flash_attention(q, k, v).dtype == torch.bfloat16
        assert paged_attention_decode(*args).dtype == torch.bfloat16


def test_engine_on_a_t4_with_a_bf16_model_takes_the_labelled_reference(monkeypatch):
    """The engine asks before it launches: bf16 decode on a GPU below 8.0 goes to the PyTorch
    reference (and says so); fp16 keeps the kernel. In 16 bits greedy decoding may drift after a
    few tokens between attention implementations, so the first tokens are compared with generate()."""
    from llmsys_lab.engine import KERNEL_PATH, REFERENCE_BF16_PATH, serve
    from llmsys_lab.generate import generate
    from llmsys_lab.model import load_tiny

    monkeypatch.setenv("LLMSYS_FORCE_ARCH", "sm75")
    model, tok = load_tiny()
    prompts = [tok(t).input_ids for t in ("ROMEO.\n", "To be, or not", "JULIET.\nO Romeo")]
    for dtype, path in ((torch.bfloat16, REFERENCE_BF16_PATH), (torch.float16, KERNEL_PATH)):
        m = model.to("cuda", dtype)
        engine, done = serve(m, prompts, 12, num_blocks=60, block_size=4, max_batch=3)
        assert engine.attention_path == path
        for i, p in enumerate(prompts):
            assert len(done[i].output) == 12 or done[i].output[-1] == 0
            assert done[i].output[:3] == generate(m, [p], 12).new_tokens[0][:3], (dtype, i)
