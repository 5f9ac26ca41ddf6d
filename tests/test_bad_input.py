"""Bad input to speculative decoding, MoE, the parallel helpers and the engine: each case gets a
one-line error that names the argument (never a bare IndexError, a nan, a hang or silent garbage)."""
import math
import time

import pytest
import torch

from llmsys_lab import moe as moe_mod
from llmsys_lab._runtime import triton_available
from llmsys_lab.configs import ModelConfig
from llmsys_lab.drafters import ModelDrafter, PromptLookupDrafter
from llmsys_lab.engine import Engine
from llmsys_lab.model import LlamaLM
from llmsys_lab.moe import MoEConfig, capacity, load_balancing_loss, route, router_z_loss
from llmsys_lab.parallel import estimate as pest
from llmsys_lab.parallel import pipeline
from llmsys_lab.parallel.comm import ring_factor
from llmsys_lab.parallel.data_parallel import shard_batch
from llmsys_lab.parallel.expert_parallel import ep_bytes, tp_moe_bytes
from llmsys_lab.parallel.launcher import launch
from llmsys_lab.parallel.sequence_parallel import ring_attention_bytes, ulysses_bytes
from llmsys_lab.parallel.tensor_parallel import ColumnParallelLinear, tp_bytes_per_layer
from llmsys_lab.parallel.zero import zero_memory
from llmsys_lab.scheduler import RequestError
from llmsys_lab.speculative import (Sampling, best_gamma, expected_speedup, expected_tokens_per_step,
                                    speculative_generate, verify)
from llmsys_lab.validate import ConfigError, ShapeError


def tiny_lm(seed=0, vocab=8, ctx=64):
    torch.manual_seed(seed)
    cfg = ModelConfig(name=f"r{seed}", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=32, vocab_size=vocab, max_position_embeddings=ctx)
    return LlamaLM(cfg).eval()


# ---- speculative.verify -------------------------------------------------------------------------
def test_verify_refuses_draft_ids_outside_the_vocabulary():
    p = torch.full((2, 5), 0.2)
    for bad in (-1, 5, 99):
        with pytest.raises(ValueError, match=rf"draft_tokens\[0\] = {bad} is outside the vocabulary 0 \.\. 4"):
            verify([bad], None, p)
    with pytest.raises(TypeError, match="draft_tokens"):
        verify([1.0], None, p)


def test_verify_refuses_p_and_q_that_are_not_distributions():
    good = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="p must hold probabilities.*negative"):
        verify([1], None, torch.tensor([[0.5, 0.6, -0.1, 0.0], [0.25] * 4]))
    with pytest.raises(ValueError, match="p must hold probabilities.*row 1 sums to 0"):
        verify([1], None, torch.tensor([[0.25] * 4, [0.0] * 4]))
    with pytest.raises(ValueError, match="p must hold probabilities.*NaN"):
        verify([1], None, torch.tensor([[0.25] * 4, [float("nan")] * 4]))
    with pytest.raises(ValueError, match="q must hold probabilities.*negative"):
        verify([1], torch.tensor([[0.5, 0.6, -0.1, 0.0]]), good)


# ---- Sampling -------------------------------------------------------------------------------------
def test_sampling_checks_its_fields():
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        Sampling(True, temperature=float("inf"))
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        Sampling(False, temperature=float("nan"))
    with pytest.raises(TypeError, match="temperature must be a number, got '1'"):
        Sampling(True, temperature="1")
    with pytest.raises(TypeError, match="do_sample must be True or False, got 'yes'"):
        Sampling(do_sample="yes")
    with pytest.raises(TypeError, match="top_k"):
        Sampling(True, top_k=2.0)


def test_a_tiny_temperature_is_the_argmax_not_a_crash():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-4.0, -5.0, -4.5]])
    probs = Sampling(True, temperature=1e-45).probs(logits)
    assert torch.isfinite(probs).all()
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    # and the usual temperatures give exactly what they gave before
    assert torch.equal(Sampling(True, temperature=0.7).probs(logits), torch.softmax(logits / 0.7, -1))


# ---- speculative_generate and drafters ---------------------------------------------------------
def test_speculative_generate_checks_block_size_and_eos():
    model = tiny_lm()
    lookup = PromptLookupDrafter()
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=f"block_size must be an int >= 1, got {bad}"):
            speculative_generate(model, lookup, [1, 2, 3], 4, cache="paged", block_size=bad)
    with pytest.raises(TypeError, match="eos_token_id must be a token id"):
        speculative_generate(model, lookup, [1, 2, 3], 4, eos_token_id="x")
    with pytest.raises(ConfigError, match="eos_token_id = 8 is outside the vocabulary 0 .. 7"):
        speculative_generate(model, lookup, [1, 2, 3], 4, eos_token_id=8)


def test_model_drafter_propose_k0_is_an_empty_proposal_and_empty_context_is_refused():
    model, draft = tiny_lm(0), tiny_lm(1)
    d = ModelDrafter(draft)
    d.begin(32)
    tokens, q = d.propose([1, 2, 3], 0, Sampling())
    assert tokens == [] and tuple(q.shape) == (0, 8)
    assert verify(tokens, q, torch.full((1, 8), 1 / 8), torch.Generator().manual_seed(0))[0] == 0
    assert PromptLookupDrafter().propose([1, 2, 1], 0) == ([], None)
    with pytest.raises(ValueError, match="context must hold at least one token"):
        d.propose([], 2, Sampling())
    with pytest.raises(ValueError, match=r"gamma \(tokens to propose\) must be an int >= 0"):
        d.propose([1, 2], -1, Sampling())
    # a student's loop that follows the text literally (k = min(gamma, left - 1), so k = 0 at the end)
    out = speculative_generate(model, ModelDrafter(draft), [1, 2, 3], 5, gamma=3)
    assert len(out.new_tokens) == 5


class GreedyDrafter:
    """A drafter that proposes more tokens than it was asked for."""
    def check_target(self, target):
        pass

    def begin(self, max_len):
        pass

    def propose(self, context, gamma, sampling, generator=None):
        return [1] * (gamma + 2), None


def test_a_drafter_that_breaks_its_contract_is_named():
    with pytest.raises(ValueError, match=r"drafter GreedyDrafter\.propose returned 5 tokens for gamma = 3"):
        speculative_generate(tiny_lm(), GreedyDrafter(), [1, 2, 3], 8, gamma=3)


def test_speedup_model_arguments():
    with pytest.raises(ConfigError, match=r"c \(draft step / target step cost\) must be a finite number"):
        expected_speedup(0.5, 4, float("nan"))
    with pytest.raises(TypeError, match="gamma must be an int"):
        expected_tokens_per_step(0.5, True)
    with pytest.raises(ValueError, match="alpha"):
        expected_tokens_per_step(float("nan"), 3)
    with pytest.raises(ConfigError, match="max_gamma must be an int >= 1, got 0"):
        best_gamma(0.7, 0.1, max_gamma=0)


def test_nan_logits_raise_a_clear_error_in_speculative_decoding():
    model = tiny_lm()
    with torch.no_grad():
        model.lm_head.weight[3] = float("nan")
    with pytest.raises(FloatingPointError, match="logits hold NaN or inf"):
        speculative_generate(model, PromptLookupDrafter(), [1, 2, 1, 2], 4)


# ---- MoE ----------------------------------------------------------------------------------------
def test_moe_capacity_factor_must_be_finite_and_a_huge_one_means_no_drop():
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="MoEConfig.capacity_factor must be a finite number"):
            MoEConfig(8, 16, 4, capacity_factor=bad)
    torch.manual_seed(0)
    layer = moe_mod.MoE(MoEConfig(8, 16, 4, capacity_factor=1e30))
    free = moe_mod.MoE(MoEConfig(8, 16, 4))
    free.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 8)
    assert torch.allclose(layer(x), free(x))
    assert bool(layer.last_routing.kept.all())


def test_route_checks_top_k_shapes_and_dtypes():
    x, w = torch.randn(6, 8), torch.randn(4, 8)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=f"top_k must be an int >= 1, got {bad}"):
            route(x, w, bad)
    with pytest.raises(TypeError, match="top_k must be an int"):
        route(x, w, 2.0)
    with pytest.raises(ShapeError, match=r"x must have 2 dims \(N, h\)"):
        route(x.reshape(2, 3, 8), w, 2)
    with pytest.raises(ShapeError, match="x has 7 features but router_weight expects 8"):
        route(torch.randn(6, 7), w, 2)
    with pytest.raises(TypeError, match="x and router_weight must have the same dtype"):
        route(x.bfloat16(), w, 2)


def test_moe_losses_and_capacity_refuse_empty_inputs():
    with pytest.raises(ShapeError, match="router_logits have 0 tokens"):
        load_balancing_loss(torch.zeros(0, 4), 2)
    with pytest.raises(ShapeError, match="router_logits have 0 experts"):
        load_balancing_loss(torch.zeros(3, 0), 1)
    with pytest.raises(ShapeError, match="router_logits have 0 tokens"):
        router_z_loss(torch.zeros(0, 4))
    with pytest.raises(ConfigError, match="num_experts must be an int >= 1, got 0"):
        capacity(10, 0, 1, 1.0)
    with pytest.raises(ConfigError, match="num_tokens must be an int >= 0, got -3"):
        capacity(-3, 4, 1, 1.0)
    with pytest.raises(ConfigError, match="top_k must be an int <= 4"):
        capacity(10, 4, 5, 1.0)
    assert capacity(0, 4, 2, 1.0) == 0
    assert capacity(10, 4, 2, 1e30) == 10                    # an expert never gets more than every token


@pytest.mark.skipif(not triton_available(), reason="needs Triton (the grouped-GEMM kernel)")
def test_grouped_gemm_block_sizes():
    from llmsys_lab.kernels.moe_grouped_gemm import grouped_gemm

    x, w, counts = torch.randn(4, 16), torch.randn(2, 16, 16), torch.tensor([1, 3])
    for bad in (0, 3, -16):
        with pytest.raises(ConfigError, match=f"block_m must be a power of two >= 16, got {bad}"):
            grouped_gemm(x, w, counts, block_m=bad)


# ---- parallel helpers ---------------------------------------------------------------------------
def test_estimate_parallel_refuses_empty_batches_and_sequences():
    cfg = ModelConfig(name="t", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=128)
    for batch, seq, name in ((0, 16, "batch"), (-4, 16, "batch"), (4, 0, "seq"), (4, -1, "seq")):
        with pytest.raises(ConfigError, match=rf"{name} \(.*\) must be an int >= 1"):
            pest.estimate_parallel(cfg, batch, seq)


def test_cli_parallel_table_uses_precision_and_refuses_a_batch_that_does_not_split():
    import argparse

    cfg = ModelConfig(name="t", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                      intermediate_size=128, vocab_size=100, max_position_embeddings=128)
    args = argparse.Namespace(tp=1, pp=2, dp=1, zero=0, micro_batches=4, batch=4, seq=16, precision="fp32")
    table = pest.report_from_args(cfg, args)
    assert "fp32" in table
    fp32 = pest.estimate_parallel(cfg, 4, 16, pest.ParallelPlan(1, 2, 1, 0, 4), "fp32")
    assert f"{fp32.memory / 2 ** 30:.1f}" in table.splitlines()[-1]
    args.batch = 1
    with pytest.raises(ConfigError, match="global batch 1 must split into dp = 1 x 4 micro-batches"):
        pest.report_from_args(cfg, args)


def test_parallel_helpers_check_world_rank_and_sizes():
    with pytest.raises(ConfigError, match="world must be an int >= 1, got 0"):
        ring_factor(0)
    with pytest.raises(ConfigError, match="rank must be an int <= 1"):
        shard_batch(torch.zeros(4, 3), 2, 2)
    with pytest.raises(ConfigError, match="world must be an int >= 1"):
        shard_batch(torch.zeros(4, 3), 0, 0)
    with pytest.raises(TypeError, match="stages must be an int"):
        pipeline.schedule("1f1b", 2.5, 2)
    with pytest.raises(ConfigError, match="micro_batches must be an int >= 1, got 0"):
        pipeline.peak_in_flight("gpipe", 2, 0)
    with pytest.raises(ConfigError, match=r"t_f \(forward time per stage\) must be > 0"):
        pipeline.simulate("gpipe", 2, 2, t_f=-1.0)
    with pytest.raises(ConfigError, match=r"t_b \(backward time per stage\) must be a finite number"):
        pipeline.simulate("gpipe", 2, 2, t_b=float("nan"))
    with pytest.raises(ConfigError, match="params must be an int >= 0"):
        zero_memory(-5, 1, 2)
    with pytest.raises(ConfigError, match="batch must be an int >= 0"):
        tp_bytes_per_layer(-1, 4, 8, 2)
    with pytest.raises(ConfigError, match="world must be an int >= 1"):
        tp_moe_bytes(4, 8, 0)
    with pytest.raises(ConfigError, match="cap must be an int >= 0"):
        ep_bytes(4, -1, 8, 2)
    with pytest.raises(ConfigError, match="world must be an int >= 1"):
        ulysses_bytes((4, 4, 4, 4), 0)
    with pytest.raises(ConfigError, match="local_kv_numel must be an int >= 0"):
        ring_attention_bytes(-4, 2)
    with pytest.raises(ConfigError, match="rank must be an int <= 1"):
        ColumnParallelLinear.from_linear(torch.nn.Linear(4, 4, bias=False), 2, 2)


def test_launch_refuses_nan_timeouts_and_lambdas():
    with pytest.raises(ConfigError, match=r"timeout \(seconds\) must be a finite number"):
        launch(ring_factor, 2, timeout=float("nan"))
    with pytest.raises(ConfigError, match=r"startup_timeout \(seconds\) must be > 0"):
        launch(ring_factor, 2, startup_timeout=0)
    with pytest.raises(ConfigError, match="launch cannot ship a lambda"):
        launch(lambda rank, world: rank, 2)


# ---- Engine -------------------------------------------------------------------------------------
def test_engine_refuses_bad_flags_arrivals_ids_and_eos():
    model = tiny_lm(ctx=128)
    with pytest.raises(TypeError, match="chunked_prefill must be True or False, got 'no'"):
        Engine(model, num_blocks=16, block_size=4, chunked_prefill="no")
    with pytest.raises(TypeError, match="eos_token_id must be a token id"):
        Engine(model, num_blocks=16, block_size=4, eos_token_id="x")
    with pytest.raises(ConfigError, match="eos_token_id = 8 is outside the vocabulary"):
        Engine(model, num_blocks=16, block_size=4, eos_token_id=8)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        Engine(model, num_blocks=16, block_size=4, check_finite=1)
    engine = Engine(model, num_blocks=16, block_size=4)
    with pytest.raises(RequestError, match=r"arrival_step must be an int >= 0 \(an iteration\), got -3"):
        engine.add_request("a", [1, 2], 3, arrival_step=-3)
    with pytest.raises(RequestError, match=r"request_id must be hashable .*got \[1\]"):
        engine.add_request([1], [1, 2], 3)


def test_engine_skips_idle_iterations_to_the_next_arrival():
    model = tiny_lm(ctx=128)
    engine = Engine(model, num_blocks=16, block_size=4, eos_token_id=None)
    engine.add_request("late", [1, 2, 3], 3, arrival_step=10 ** 6)
    began, calls, done = time.perf_counter(), 0, []
    while engine.scheduler.has_work:
        done += engine.step()
        calls += 1
    assert calls == 3                                          # no empty iteration was stepped through
    assert time.perf_counter() - began < 10
    assert [r.id for r in done] == ["late"] and len(done[0].output) == 3
    assert len(engine.log) == 3                                # three iterations ran, none idle
    assert engine.log[0]["iteration"] == 10 ** 6
    assert done[0].admitted_at == 10 ** 6


def test_engine_nan_logits_raise_with_the_check_and_name_the_request():
    model = tiny_lm(ctx=128)
    with torch.no_grad():
        model.lm_head.weight[2] = float("nan")
    engine = Engine(model, num_blocks=16, block_size=4, eos_token_id=None, check_finite=True)
    engine.add_request("r0", [1, 2, 3], 3)
    with pytest.raises(FloatingPointError, match=r"iteration 1: the logits of request\(s\) \['r0'\] hold NaN"):
        list(engine.run())


def test_unchecked_math_stays_finite():
    """The fixes above must not touch the ordinary numbers (sanity of the helpers themselves)."""
    assert ring_factor(4) == 1.5
    assert expected_speedup(0.8, 4, 0.0) == pytest.approx(expected_tokens_per_step(0.8, 4))
    assert best_gamma(0.9, 0.05, max_gamma=1) == 1
    assert math.isclose(tp_bytes_per_layer(1, 2, 3, 2), 4 * 1.0 * 6 * 4)
