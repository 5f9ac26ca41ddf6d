"""The lectures' worked examples, as data: one home for what the slides show.

Each example records where it comes from (the transcript file in the course material and the
slide's own words) and the numbers or tables the slide shows. Lessons print them beside what the
kit computes, and ``tests/test_lecture_examples.py`` asserts that the kit's code reproduces each
one. Where a slide is wrong or garbled, the example keeps the slide's version *and* says what is
wrong (``note``), so a lesson can show "slide says / kit shows / why".

Transcripts: 000 (attention, FLOPs, KV cache, continuous batching, PagedAttention), 001 (PagedAttention
recap, parallelism), 002 (KV cache, PagedAttention step by step, TTFT/TPOT, goodput, disaggregation),
003 (training memory, scaling laws, MoE), 004 (TTFT/TPOT, FlashAttention, Orca).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One worked example of a lecture.

    name:   short identifier used by lessons and tests (e.g. "paged_single_request").
    source: transcript file(s), e.g. "002".
    slide:  the slide's own words (quoted, shortened where long).
    data:   what the slide shows, as plain Python data (numbers, tables, lists).
    note:   where the slide is wrong, garbled or uses another convention, what and why; else "".
    """

    name: str
    source: str
    slide: str
    data: Any = field(default=None)
    note: str = ""


EXAMPLES: dict[str, Example] = {}


def example(name: str, source: str, slide: str, data: Any = None, note: str = "") -> Example:
    """Register an example (names are unique)."""
    if name in EXAMPLES:
        raise ValueError(f"lecture example {name!r} is defined twice")
    EXAMPLES[name] = ex = Example(name, source, slide, data, note)
    return ex


def get(name: str) -> Example:
    """The example called `name`, with a clear error listing the known names otherwise."""
    try:
        return EXAMPLES[name]
    except KeyError:
        raise KeyError(f"no lecture example {name!r}; known: {', '.join(sorted(EXAMPLES))}") from None


# ---- serving: KV cache, continuous batching, PagedAttention, goodput, Orca (000, 002, 004) ----

PAGED_PROMPT_A = "Alan Turing is a computer scientist"
PAGED_COMPLETION_A = "and mathematician renowned"
PAGED_PROMPT_B = "Artificial Intelligence is the future of technology"

example(
    "paged_single_request", "002",
    "Logical & physical token blocks. Prompt: \"Alan Turing is a computer scientist\", Completion: \"and "
    "mathematician renowned\". Block table: physical block number / # filled = 7 / 4, 1 / 4, 5 / 1. "
    "block 5: renowned (\"Allocated on demand\").",
    data={"block_size": 4, "num_blocks": 8, "prompt": PAGED_PROMPT_A, "completion": PAGED_COMPLETION_A,
          # (physical block, # filled) per logical block, after each step of the slide sequence
          "steps": {"prompt": [(7, 4), (1, 2)], "and": [(7, 4), (1, 3)], "mathematician": [(7, 4), (1, 4)],
                    "renowned": [(7, 4), (1, 4), (5, 1)]},
          "allocation_order": [7, 1, 5]},
    note="One request alone. The slide allocates 7, 1, then 5 for 'renowned'; the two-request figure "
         "(paged_two_requests) is a different figure, taken from the vLLM paper, where 'renowned' is in block 3.",
)

example(
    "paged_two_requests", "002 (the vLLM paper's Figure 7)",
    "Serving multiple requests: request A \"Alan Turing is a computer scientist and mathematician renowned\" and "
    "request B \"Artificial Intelligence is the future of technology\" share the physical blocks (KV cache).",
    data={"block_size": 4, "num_blocks": 8,
          "A": [(7, 4), (1, 4), (3, 1)], "B": [(2, 4), (5, 3)],
          # physical blocks from low to high, as the slide lists them
          "physical": {1: "computer scientist and mathematician", 2: "Artificial Intelligence is the",
                       3: "renowned", 5: "future of technology", 7: "Alan Turing is a"},
          "allocation_order": [7, 1, 3, 2, 5]},
    note="The transcript keeps the physical blocks' contents in order but loses their numbers; A's table 7, 1, 3 "
         "and B's 2, 5 are the paper's, and they list the blocks in the slide's order. A's third block differs from "
         "the single-request slide (5 there): two figures, two allocation orders.",
)

STATIC_002 = {"S1": "S1 S1 S1 S1 S1 END . .", "S2": "S2 S2 S2 S2 S2 S2 S2 END",
              "S3": "S3 S3 S3 S3 END . . .", "S4": "S4 S4 S4 S4 S4 S4 END ."}
example(
    "static_batching_T1_T8", "002 (also 000)",
    "Static batching, T1..T8: S1 ends at T6, S2 at T8, S3 at T5, S4 at T7. \"Issues with static batching: requests "
    "may complete at different iterations; idle GPU cycles; new requests cannot start immediately.\"",
    data={"rows": STATIC_002,
          # per request: tokens generated including END (the simulator's output_len)
          "lengths": {"S1": 6, "S2": 8, "S3": 5, "S4": 7}},
    note="Lecture 000's transcript of the same slide lost cells: there S2 and S4 end at T2. Lecture 002's table is "
         "self-consistent, so the kit follows 002.",
)

example(
    "continuous_batching_T1_T8", "002 (also 000)",
    "Continuous batching, T1..T8: S5 takes S3's slot at T6, S6 takes S1's at T7, S7 takes S4's at T8. \"Benefits: "
    "higher GPU utilization; new requests can start immediately.\"",
    data={"rows": {"S1": "S1 S1 S1 S1 S1 END S6 S6", "S2": "S2 S2 S2 S2 S2 S2 S2 END",
                   "S3": "S3 S3 S3 S3 END S5 S5 S5", "S4": "S4 S4 S4 S4 S4 S4 END S7"},
          "arrivals": {"S5": 6, "S6": 7, "S7": 8},
          # tokens including END for the late arrivals: the slide cuts at T8, any length that runs past it fits
          "lengths": {"S5": 4, "S6": 3, "S7": 3}},
    note="Lecture 000's copy of this slide, with S2 and S4 ending at T2, leaves slots 2 and 4 idle from T3 to T8 "
         "although no request is waiting; 002's table (every slot busy) is the one the kit reproduces.",
)

example(
    "orca_walkthrough_R1_R5", "002, 004",
    "Continuous Batching Step-by-Step, maximum serving batch size = 3. Receives two new requests R1 and R2; "
    "Iteration 1: decode R1 and R2; receive a new request R3; finish decoding R1 and R2; Iteration 2: decode R1, R2, "
    "R3; receive R4, R5; R2 completes; Iteration 3: decode R1, R3, R4.",
    data={"max_batch": 3, "batches": {1: ["R1", "R2"], 2: ["R1", "R2", "R3"], 3: ["R1", "R3", "R4"]},
          "waiting_after_3": ["R5"], "words": {"R1": "optimizing ML systems | requires ML",
                                               "R2": "LLM serving is | critical."}},
)

example(
    "orca_selective_batching", "004",
    "Solution 2: Selective Batching. Only Attention operation does not work with batching tensors with diff. L_i. "
    "Batch for other ops. (Layer Norm, GeLU, etc.) Coalesce [L_i, H] tensor to [sum L_i, H] for batching. "
    "x1: [1,H], x2: [1,H], x3: [2,H], x4: [3,H] -> [7,H] tensor.",
    data={"lengths": {"x1": 1, "x2": 1, "x3": 2, "x4": 3}, "packed_rows": 7},
)

example(
    "orca_scheduling", "004",
    "Enforces iteration-level first-come-first-served (FCFS) property. Maximum batch size -> throughput vs. latency "
    "control knob. Keep track of number of reserved slots to avoid deadlock. Slot := memory required for storing an "
    "Attention key and value for a single token. Reserves max_tokens memory slots per request.",
    data={"reserve": "prompt + max_tokens slots per request at admission"},
    note="The kit's scheduler is FCFS per iteration too, but it reserves only the blocks a request fills (vLLM) and "
         "resolves a dry pool by preempting the newest request, instead of Orca's up-front max_tokens reservation.",
)

example(
    "goodput_vs_throughput", "002",
    "High Throughput != High Goodput. Throughput = 10 rps = completed request / time. Goodput = 3 rps = completed "
    "request within SLO / time. A high throughput system can have low goodput! TPOT SLOs: human reading speed "
    "(P99 latency = 250ms), data output generation (P99 latency = 35ms).",
    data={"throughput_rps": 10, "goodput_rps": 3, "tpot_p99_slo_s": {"chatbot (reading speed)": 0.250,
                                                                       "data output generation": 0.035}},
)

example(
    "disaggregation_goodput", "002 (DistServe)",
    "Colocate: 1 GPU for both prefill and decode. Max system goodput = Min(Prefill, Decode) = 1.6 rps / GPU. "
    "Disaggregate (2P1D): 2 GPU for prefill + 1 GPU for decode; goodput = Min(5.6 x 2, 10) rps / 3 GPU = 3.3 rps / "
    "GPU. Simple disaggregation achieves 2x goodput (per GPU).",
    data={"prefill_rps_per_gpu": 5.6, "decode_rps_per_gpu": 10.0, "colocated_rps_per_gpu": 1.6,
          "2P1D_rps_per_gpu": 3.3, "gain": 2},
    note="5.6 and 10 rps are what one GPU sustains under the SLO doing only prefill or only decode. A colocated GPU "
         "that split its time between them without interference would reach 1 / (1/5.6 + 1/10) = 3.6 rps; the "
         "slide's 1.6 rps is DistServe's measurement, lower because each phase slows the other (its Min is over "
         "the two phases' rates *while colocated*, which the slide does not give). 3.3 / 1.6 = 2.1, the slide's 2x.",
)



# ---- estimators: parameters, FLOPs, training memory, Chinchilla (000, 003) ----

example(
    "llama2_7b_forward_flops", "000",
    "LLama 2 7B Flops Forward: N(6bsh^2 + 4bs^2h + 3bs^2n + 2bsh^2) + N(6bshi) + 2bshv ~ 63 TFLOPs "
    "(b=1, s=4096, n=32, d=128, h=4096, i=11008, v=32000, N=32)",
    data={"batch": 1, "seq": 4096, "forward_tflops": 63},
)

example(
    "llama2_7b_training_flops", "000",
    "Training Computational Costs Breakdown: Total Training TeraFLOPs: 192.17 TFLOPs; FLOP Distribution by "
    "Layer: Embedding 1.676%, Normalization 0.007%, Residual 0.003%, Attention 41.276%, MLP 55.361%, Linear 1.676%",
    data={"batch": 1, "seq": 4096, "training_tflops": 192.17,
          "shares": {"embedding": 1.676, "norm": 0.007, "residual": 0.003, "attention": 41.276, "mlp": 55.361,
                     "lm_head": 1.676}},
    note="The slide's numbers follow one convention exactly (estimators.flops.slide_training_breakdown: 3 x forward; "
         "attention without RoPE; MLP 6bshi + 2bsi for Swish and the product together; residuals 4bsh per layer; "
         "embedding counted as a 2bshv one-hot matmul): 192.168 TFLOPs and all six shares. The slide's own "
         "per-operation table counts Swish 4bsi and the product bsi (5bsi, not 2bsi), RoPE 3bsnd and one bsh per "
         "residual add; counted that way (the kit's forward_flops_table) the total is 192.18 TFLOPs and MLP 55.364%, "
         "residual 0.002%. Without the embedding and forward only (the estimator view) the shares are attention "
         "42.0%, MLP 56.3%: the embedding's 1.676% is gone from the denominator.",
)

example(
    "chinchilla_law", "003",
    "Today's SoTA Law: L(N, D) = 406.4 / N^0.34 + 410.7 / D^0.29 + 1.69",
    data={"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta_slide": 0.29, "beta_paper": 0.28,
          "gopher_flops": 5.76e23, "chinchilla_params": 70e9, "chinchilla_tokens": 1.4e12},
    note="The slide writes D^0.29; Hoffmann et al. (2022, eq. 10) fit beta = 0.28, which the kit uses. The "
         "parametric fit (the paper's approach 3) with these published, rounded coefficients puts the compute-optimal "
         "model at Gopher's budget (5.76e23 FLOPs) at about 32B parameters and 3.0T tokens, 93 tokens per parameter "
         "(the paper's own approach-3 estimate is 40B). Chinchilla's 70B / 1.4T tokens (about 20 tokens per "
         "parameter) come from approaches 1 and 2 (minimum-loss envelope and IsoFLOP profiles: N_opt and D_opt both "
         "grow as C^0.5), which the paper followed. With the slide's 0.29 the same formula gives about 48B / 2.0T.",
)

example(
    "llama2_7b_training_memory", "003",
    "Memory for training: weights, gradients, optimizer states (AdamW: momentum and variance) and activations",
    data={"batch": 1, "seq": 4096, "precision": "mixed"},
    note="The peak of a step is not the sum of all parts: the activations are freed during the backward pass while "
         "the gradients are being written, so the estimate takes the largest of three moments (end of forward: weights, optimizer states, bf16 "
         "weight copies, activations, the loss's backward; the last layer's backward; the optimizer step: weights, "
         "gradients, optimizer states). For Llama-2-7B "
         "at b=1, s=4096 with AMP the kit's rows add up to 142.1 GiB; the peak is 117.0 GiB, at the end of the forward pass (where the loss's backward holds 1.0 GiB of fp32 gradients of the log-probabilities and logits), without the 25.1 GiB of gradients. (Before the estimator counted the loss's backward the table read 141.8 and 116.8.)",
)



# ---- compute: attention, FLOPs, memory, scaling laws, FlashAttention, latency (000, 001, 003, 004) ----
example(
    "memory_hierarchy", "004",
    "Memory is arranged hierarchically: GPU SRAM is small, and supports the fastest access; GPU HBM is larger "
    "but with much slower access; CPU DRAM is huge, but the slowest of all",
    data={"GPU SRAM": {"size": "20 MB", "bandwidth_TBps": 19.0},
          "GPU HBM": {"size": "40 GB", "bandwidth_TBps": 1.5},
          "CPU DRAM": {"size": "> 1 TB", "bandwidth_TBps": 0.0128}},
    note="The figure is the FlashAttention paper's (A100 40 GB: 1.5 TB/s HBM). Lesson 06 adds the H200's "
         "141 GB at 4.8 TB/s as the other end of the HBM range.",
)

example(
    "online_softmax_two_blocks", "004",
    "m(x) = max(m(x1), m(x2)); f(x) = [e^(m(x1)-m(x)) f(x1), e^(m(x2)-m(x)) f(x2)]; "
    "l(x) = e^(m(x1)-m(x)) l(x1) + e^(m(x2)-m(x)) l(x2); softmax(x) = f(x) / l(x)",
    data={"x1": [1.0, 3.0, 2.0, 0.5], "x2": [4.0, 1.5, -1.0, 2.0],
          "m1": 3.0, "l1": 1.5853, "m2": 4.0, "l2": 1.2242, "m": 4.0, "l": 1.8074},
    note="The slide derives the merge symbolically; these two blocks (lesson 06, section 2) are the kit's worked "
         "numbers, m and l rounded to 4 decimals.",
)

example(
    "operator_classes", "004",
    "Table 1. Proportions for operator classes in PyTorch (% flop, % runtime): tensor contraction 99.80 / 61.0, "
    "stat. normalization 0.17 / 25.5, element-wise 0.03 / 13.5",
    data={"tensor contraction": (99.80, 61.0), "statistical normalisation": (0.17, 25.5),
          "element-wise": (0.03, 13.5)},
    note="From Ivanov et al., 'Data Movement Is All You Need' (a BERT encoder layer, PyTorch, V100). "
         "benchmarks/operator_classes.py measures the same split for a Llama training step; lesson 06 prints "
         "both tables. With softmax fused into the attention kernel (SDPA) the normalisation share shrinks.",
)

example(
    "flash_numeric_deviation", "004",
    "Flash Attention sees roughly an order of magnitude more numeric deviation as compared to Baseline "
    "Attention at BF16 when measured during an isolated forward pass (Golden et al.)",
    data={"flash_vs_baseline_order": 10},
    note="Golden et al.'s baseline computes attention with higher-precision intermediates (S and the softmax in "
         "fp32, only the output in BF16). Lesson 06's first comparison uses standard attention run in bf16, which "
         "rounds S and P to bf16 in memory: against that baseline flash is slightly better (about 0.8x). "
         "benchmarks/numeric_deviation.py measures against both baselines.",
)

example(
    "e2e_latency", "004",
    "E2E Latency = TTFT + (TPOT * the number of generated tokens)",
    data={"slide": "TTFT + TPOT * n", "kit": "TTFT + TPOT * (n - 1)"},
    note="The first generated token is already paid for by TTFT (prefill ends by sampling it), so only the "
         "n - 1 later tokens each cost one TPOT. The slide's TTFT + TPOT * n counts the first token twice "
         "(or defines TTFT as the prefill alone).",
)

example(
    "gqa_all_heads_share", "000",
    "GQA (group query attention): all heads share K, V but have different Q",
    data={"all query heads share one K/V head": "MQA", "groups of query heads share a K/V head": "GQA"},
    note="'All heads share K, V' is multi-query attention (MQA, num_kv_heads = 1). Grouped-query attention "
         "shares one K/V head within each *group* of query heads (1 < num_kv_heads < num_heads); lesson 01, "
         "section 7, shows all three.",
)


# ---- lessons 07-10: performance, parallelism, MoE, speculative decoding (000, 001, 002, 003, 004) ----
# The slide's words verbatim (its LaTeX too); " | " separates lines of one slide, " - " starts a bullet.

example(
    "llm_components_fast_slow", "000",
    "Computing Components in LLMs? - Transformer decoders (many of them) - self-attentions (slow) - layernorm, "
    "residual (fast) - MLPs (slow) - Nonlinear (fast) - Word embeddings (fast) - Position embeddings (fast)",
    data={"slow": ["self-attentions", "MLPs"],
          "fast": ["layernorm, residual", "Nonlinear", "Word embeddings", "Position embeddings"],
          # lesson 07's operator classes of the slide's components
          "class": {"self-attentions": "tensor contraction", "MLPs": "tensor contraction",
                    "layernorm, residual": "statistical normalisation", "Nonlinear": "element-wise"}},
    note="'Fast' and 'slow' are in FLOPs: attention and the MLPs hold the matmuls. In time the 'fast' components "
         "are not small: they are memory-bound, and lesson 07's measured training step (benchmarks/"
         "operator_classes.py) gives normalisation and element-wise operators a share of the runtime tens to "
         "hundreds of times their share of the FLOPs.",
)

example(
    "parallelism_tradeoff", "001",
    "Inter-op parallelism: | Requires point-to-point communication but results in device idle | Intra-op "
    "parallelism: | Devices are busy but requires collective communication | Trade-off | Inter-operator Parallelism "
    "Intra-operator Parallelism | Communication Less More | Device Idle Time More Less",
    data={"communication": {"inter-op": "less", "intra-op": "more"},
          "device idle time": {"inter-op": "more", "intra-op": "less"}},
)

example(
    "intra_op_two_matmuls", "001",
    "Inside Intra- and Inter-op Parallelism | $$Y = X \\cdot W_1 \\cdot W_2 = X \\cdot [W_1^{d1} \\quad W_1^{d2}] \\cdot "
    "\\begin{bmatrix} W_2^{d1} \\\\ W_2^{d2} \\end{bmatrix}$$",
    data={"devices": 2, "W1_split": "columns", "W2_split": "rows", "all_reduces_forward": 1},
    note="The slide shows the split; the communication ('Looking Into the Communication') is one all-reduce of "
         "the two partial products X W_1^{di} W_2^{di} in the forward pass (Megatron's g), and one more for the "
         "gradient of X in the backward pass (f). An element-wise activation between the matmuls, as in an MLP, "
         "keeps the split exact.",
)

example(
    "parameter_server_vs_allreduce", "001",
    "Data Parallelism | How to implement this communication? | Two Solutions | - Parameter Server | - AllReduce | "
    "- Key assumption: | - The model can fit into an (GPU) worker memory hence we can create many replica",
    data={"server_link_bytes": "(N - 1) S each way", "ring_bytes_per_rank": "2 (N - 1) / N S"},
    note="The byte counts are the kit's (lesson 08, section 4): S is the gradient's size in bytes.",
)

example(
    "sequence_parallel_questions", "003",
    "s is large: can we partition along s? - Partition n in attention (the number of head dimension) and s in MLP "
    "- Deepspeed ulysses sequence parallelism - What communication is needed? - What if #head << # GPUs or is not "
    "a multiple of 8 - partition s in both attention and MLP - Ring Attention",
    data={"ulysses": "two all-to-alls per attention (sequence -> heads, heads -> sequence); N must divide the heads",
          "ring_attention": "K/V blocks passed around a ring in N - 1 hops; any number of heads"},
    note="The answers are the kit's (lesson 08, section 8): Ulysses needs the number of (K/V) heads to be a "
         "multiple of the degree; Ring Attention does not.",
)

example(
    "moe_gating", "003",
    "A Closer Look at Mixture-of-Experts | A typical MoE layer (assume single instance and activate two experts) | "
    "$$G = \\text{Softmax}(W_G X)$$ | $$I = \\{i_0, i_1\\} = \\text{Top}K(G, k = 2)$$ | "
    "$$s_0 = \\frac{G_{i_0}}{(G_{i_0} + G_{i_1})}, s_1 = \\frac{G_{i_1}}{(G_{i_0} + G_{i_1})}$$ | "
    "$$Y = s_0 \\text{FFN}_{i_0}(X) + s_1 \\text{FFN}_{i_1}(X)$$",
    data={"top_k": 2, "renormalised": True},
)

example(
    "moe_scaling", "003",
    "MoE from the Scaling Law Perspective - Parameters - MLP params dominate LLMs - MLP params x N/2 - Increase "
    "drastically - Memory - parameter related x N/2 - activation? - Compute - Only increase mildly",
    data={"experts": 8, "top_k": 2, "mlp_params_ratio": 4},
    note="N is the number of experts with two active (top-2): against the dense model of equal compute per token "
         "the MLP parameters grow N/2-fold. Mixtral-8x7B is exactly that case (lesson 09, section 5).",
)

example(
    "latency_step_times_steps", "000, 002, 003",
    "Latency = step latency * # steps",
    data={"formula": "step latency * number of steps"},
    note="At batch 1 decoding takes one target step per token; speculative decoding (lesson 10) cuts the number "
         "of target steps below the number of tokens.",
)

example(
    "gpt3_serving_gpus", "003, 004",
    "LLMs are Slow and Expensive to Serve - At least ten A100-40GB GPUs to serve 175B GPT-3 in half-precision",
    data={"params": 175e9, "bytes_per_param": 2, "gpu_bytes": 40e9, "gpus": 10},
    note="The weights alone are 350 GB: 9 GPUs of 40 GB just to hold them (8.75); the tenth leaves room for "
         "the KV cache and activations.",
)

example(
    "vllm_throughput", "002",
    "In our experiments, vLLM achieves up to **24x** higher throughput compared to HF and up to **3.5x** higher "
    "throughput than TGI. | LLaMA-13B. A100-40GB",
    data={"vs_hf": 24, "vs_tgi": 3.5, "model": "LLaMA-13B", "gpu": "A100-40GB"},
    note="The kit's own ratio (lesson 07, section 6: the engine against HF generate with static batches, "
         "benchmarks/serving.py) is measured on another model, GPU and workload: it shows the same mechanism "
         "(continuous batching, paged KV), not the same number.",
)
