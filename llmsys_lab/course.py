"""The course manifest: every lesson of the kit, in order, in one place.

Adding a lesson is one ``Lesson(...)`` entry in ``LESSONS`` (plus the notebook, its hints file and, if it
has one, its assignment). Everything that lists lessons reads this tuple:

* the README's lesson and assignment tables and lesson 00's table of lessons (written by
  ``python scripts/course_tables.py``, ``make course-tables``; ``tests/test_course.py`` fails when stale);
* the README's Colab table and every notebook's badge (``scripts/colab.py``);
* ``python -m llmsys_lab doctor``: what each lesson and assignment shows without Triton;
* the tests that execute or grade every notebook (nbval's lesson set is checked against it, the run
  without Triton, the CPU-time budget, both graders, the browser test of every widget, the exercise hints).

A lesson waiting for its GPU reference run lives in ``notebooks/pending/`` (``pending=True``): nbval does
not compare it yet, everything else runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent      # the source checkout (notebooks/, solutions/, ...)


@dataclass(frozen=True)
class Lesson:
    number: int                 # NN in the file names
    slug: str                   # "NN_topic": notebooks/NN_topic.ipynb, notebooks/exercise_hints/NN_topic.md
    title: str                  # short name (lesson 00's table)
    lectures: str               # the lectures it teaches ("000, 003", "—")
    builds: str                 # what students build (lesson 00's table)
    topic: str                  # what the lesson covers (the README's table)
    pending: bool = False       # waiting for its GPU reference outputs in notebooks/pending/
    assignment: str | None = None        # "NN_name/notebook.ipynb" under solutions/ and assignments/
    implements: str = ""                 # what students implement in it (README)
    graded: str = ""                     # its graded tests and their points, "name 3, other 2" (README)
    widgets: tuple[str, ...] = ()        # views it shows, "module.Class" under llmsys_lab.viz
    without_triton: str | None = None    # what the lesson cannot show without Triton (None: nothing)
    assignment_without_triton: str | None = None   # ... and its assignment
    results: tuple[str, ...] = ()        # stored benchmark results it reads (benchmarks/results/NAME.json)

    def __post_init__(self):
        if not (isinstance(self.number, int) and 0 <= self.number <= 99):
            raise ValueError(f"Lesson number must be an int in 0..99, got {self.number!r}")
        if not self.slug.startswith(f"{self.number:02d}_"):
            raise ValueError(f"Lesson slug must start with its number {self.number:02d}_, got {self.slug!r}")
        if self.assignment is not None and (self.assignment.count("/") != 1 or not self.assignment.endswith(".ipynb")
                                            or not self.assignment.startswith(f"{self.number:02d}_")):
            raise ValueError(f"Lesson {self.number:02d} assignment must be 'NN_name/notebook.ipynb' with its "
                             f"number, got {self.assignment!r}")
        if self.assignment is None and (self.implements or self.graded or self.assignment_without_triton):
            raise ValueError(f"Lesson {self.number:02d} describes an assignment but names none (assignment=None)")

    # ---- where its files are (relative to the repository root) ----
    @property
    def notebook(self) -> str:
        return f"notebooks/{'pending/' if self.pending else ''}{self.slug}.ipynb"

    @property
    def hints(self) -> str:
        return f"notebooks/exercise_hints/{self.slug}.md"

    @property
    def solution(self) -> str | None:
        return f"solutions/{self.assignment}" if self.assignment else None

    @property
    def student_notebook(self) -> str | None:
        return f"assignments/{self.assignment}" if self.assignment else None

    @property
    def assignment_name(self) -> str | None:
        """The nbgrader assignment (the folder): "04_paged_kv"."""
        return self.assignment.split("/")[0] if self.assignment else None

    @property
    def needs_triton(self) -> bool:
        """Whether some part of the lesson or its assignment runs a Triton kernel (see without_triton)."""
        return bool(self.without_triton or self.assignment_without_triton)

    @property
    def graded_points(self) -> dict[str, int]:
        """{graded test: points} as ``graded`` states them."""
        out = {}
        for part in filter(None, (p.strip() for p in self.graded.split(", "))):
            name, _, points = part.rpartition(" ")
            out[name] = int(points)
        return out


LESSONS: tuple[Lesson, ...] = (
    Lesson(
        number=0, slug="00_setup_and_orientation", title="setup and orientation",
        lectures="—",
        builds="this page: the doctor, CPU vs GPU, self-checks",
        topic="the doctor, CPU vs GPU, Triton's interpreter (and the PyTorch fallback where Triton is "
              "missing), self-checks, how notebooks are verified",
        without_triton="the doctor's tiny Triton kernel (softmax) is not run",
    ),
    Lesson(
        number=1, slug="01_attention", title="attention",
        lectures="000",
        builds="self-attention (decomposed and matrix form), causal mask, multi-head, GQA/MQA, the LLaMA "
               "block, checked against PyTorch and Hugging Face",
        topic="next-token prediction; self-attention in decomposed and matrix form; $\\sqrt d$; causal mask "
              "(masked and skipped); multi-head, GQA, MQA (the lecture's \"all heads share K, V\" is MQA); "
              "attention heat-map widget; original vs LLaMA block (RMSNorm, RoPE, SwiGLU); checks against "
              "SDPA and `transformers`' Llama layer",
        assignment="01_attention/attention.ipynb",
        implements="scaled dot-product attention, the causal mask (bottom-right aligned), causal attention, "
                   "GQA/MQA",
        graded="attention 3, causal mask 2, causal attention 2, GQA 3",
        widgets=("attention_view.AttentionView",),
    ),
    Lesson(
        number=2, slug="02_estimators", title="estimators",
        lectures="000, 003",
        builds="parameters, FLOPs (Llama-2-7B: ~63 TFLOPs forward at s = 4096), memory, roofline, scaling "
               "laws",
        topic="parameters (exact vs `transformers`), the lecture's per-operation FLOP table (Llama-2-7B: 63 "
              "TFLOPs forward; 192.17 training in the slide's convention, 192.18 in the kit's fuller count, "
              "both shown), agreement with `FlopCounterMode`, training memory at three moments (what is alive "
              "at the peak), the SDPA backend that runs (flash / memory-efficient / math) and the math path's "
              "$s^2$ term, validated on a GPU grid; inference memory and the max batch at the out-of-memory "
              "boundary; KV cache, prefill/decode roofline with the ridge points, Chinchilla compute-optimal "
              "models (slide's exponent vs the paper's, approach 3 vs 1/2); estimator widget",
        assignment="02_estimators/estimators.ipynb",
        implements="parameter count, forward matmul FLOPs, KV bytes per token, Chinchilla compute-optimal N "
                   "and D",
        graded="parameters 3, FLOPs 3, KV bytes 2, compute-optimal 2",
        widgets=("estimator_view.EstimatorView",),
        results=("inference_memory", "training_memory",),
    ),
    Lesson(
        number=3, slug="03_kv_cache", title="KV cache",
        lectures="000, 002, 004",
        builds="prefill vs decode on a small model the kit trains; TTFT, TPOT, throughput",
        topic="the bundled Shakespeare model; decoding without and with a KV cache (prefill vs decode), why Q "
              "is not cached, masked vs cached scores; tokens identical to `transformers`' `generate` "
              "(batched, left-padded); FLOPs and measured step time with/without cache, the launch floor "
              "(operators per decode step) and where the cache wins; cache bytes per token vs the estimator; "
              "TTFT, TPOT per request token, end-to-end latency = TTFT + TPOT x (n - 1) vs the slide's x n, "
              "throughput",
        assignment="03_kv_cache/kv_cache.ipynb",
        implements="a KV cache for the bundled model, greedy generation with prefill + one-token decode steps",
        graded="cache 3, same tokens as without a cache 4, decode steps 3",
    ),
    Lesson(
        number=4, slug="04_paged_attention", title="PagedAttention",
        lectures="000, 001, 002",
        builds="block allocator, block tables (\"Alan Turing is a computer scientist ...\"), a paged attention "
               "kernel",
        topic="the lecture's \"Alan Turing ...\" block table step by step, as the single-request slide (7, 1, "
              "5) and the two-request figure (7, 1, 3 and 2, 5), each checked against `llmsys_lab.lecture`; a "
              "block-table visualiser widget; K/V in physical blocks with tokens identical to the contiguous "
              "cache and `transformers`; copy-on-write and prefix caching (hit rate); the Triton paged decode "
              "kernel (vs gather reference and SDPA; bandwidth table); KV utilisation of max-length "
              "reservation vs paging and the resulting batch size",
        assignment="04_paged_kv/paged_kv.ipynb",
        implements="a block allocator, block tables (add/append/free), a paged K/V gather and paged decode "
                   "attention",
        graded="allocator 2, the lecture's \"Alan Turing\" tables (one request; two requests) 2, traces vs the "
               "kit 2, gather 2, paged attention 2",
        widgets=("block_view.BlockTableView",),
        without_triton="the Triton paged decode kernel: its output and timing are not shown; the PyTorch "
                       "reference (paged_attention_reference) reads the same blocks",
        results=("paged_attention",),
    ),
    Lesson(
        number=5, slug="05_continuous_batching", title="continuous batching",
        lectures="000, 002, 004",
        builds="Orca's iteration-level scheduling (the T1..T8 tables, R1..R5), an engine serving real "
               "requests",
        topic="static vs continuous batching (lecture 002's T1..T8 tables; 000's garbled copy noted), the "
              "R1..R5 walk-through with maximum batch 3, a timeline widget; an engine with selective batching "
              "on the paged cache (the slide's [7, H] packed batch traced in the engine; outputs identical to "
              "generating alone, with preemption and chunked prefill); Orca's FCFS and reserved slots vs "
              "preemption; a seeded workload (warmed up before timing; KV utilisation explained); throughput "
              "vs goodput (the slide's 10 vs 3 rps); the GPU serving benchmark against transformers (static "
              "`generate` and its continuous batching); prefill/decode interference, chunked prefill, "
              "disaggregation goodput",
        assignment="05_continuous_batching/continuous_batching.ipynb",
        implements="one scheduler iteration: admit, run, retire, preempt (static and continuous)",
        graded="static (T1..T8) 2, continuous 2, R1..R5 walk-through 2, preemption 2, random traces 2",
        widgets=("timeline_view.TimelineView",),
        without_triton="the engine's decode attention uses the PyTorch reference of paged decode attention "
                       "instead of the Triton kernel (Engine.attention_path says which ran)",
        results=("online_serving", "serving",),
    ),
    Lesson(
        number=6, slug="06_flash_attention", title="FlashAttention",
        lectures="004",
        builds="operator fusion, the online softmax, a Triton kernel forward and backward; memory, numerics, "
               "speed",
        topic="operator fusion; the memory hierarchy and Algorithm 0's HBM traffic (one model for both, "
              "measured: GB/s where memory-bound, TFLOP/s where compute-bound); safe softmax; the lecture's "
              "two-block online-softmax derivation, then many blocks; tiled FlashAttention in PyTorch with a "
              "tiling step-through widget; the Triton forward kernel in four steps (one tile, the "
              "online-softmax loop, causal skipping, ragged lengths); the backward by recomputation from the "
              "saved log-sum-exp; peak memory (quadratic vs linear), numerical deviation in fp32/fp16/bf16 "
              "against both baselines (Golden et al.'s fp32 intermediates and bf16 Algorithm 0); benchmarks "
              "against SDPA's flash, cuDNN, efficient and math backends (speed-ups); the lecture's operator "
              "classes (% FLOPs vs % runtime) measured on a Llama training step",
        assignment="06_flash_attention/flash_attention.ipynb",
        implements="the online-softmax merge, blockwise attention in PyTorch, the FlashAttention forward "
                   "kernel in Triton; a backward pass as an ungraded bonus",
        graded="merge 2, online attention 2, kernel 3, causal kernel 2, ragged lengths 1",
        widgets=("tiling_view.TilingView",),
        without_triton="the Triton kernels (softmax, the four FlashAttention steps, the forward/backward "
                       "kernel) do not run; their source is shown and the PyTorch tiled version runs",
        assignment_without_triton="the kernel parts are \"not gradable on this machine\" (neither passed nor "
                                  "failed)",
        results=("flash_attention", "numeric_deviation", "operator_classes",),
    ),
    Lesson(
        number=7, slug="07_performance", title="performance",
        lectures="004",
        builds="where a decode step's time goes: operator classes, a profiler trace, CUDA graphs, the "
               "roofline, split-KV attention, fusion, whole serving iterations in graphs",
        topic="where the time goes: the lecture's operator classes (% FLOPs vs % runtime; the slide beside a "
              "`torch.profiler` measurement); a profiler trace of the engine's decode iteration (CPU launches "
              "vs GPU kernels, idle gaps); the ladder engine → engine with CUDA graphs → plain PyTorch decode "
              "over a static cache, eager and CUDA-graphed → the roofline, measured in one run; split-KV "
              "decode attention (programs vs SMs, the log-sum-exp merge checked against full attention, "
              "bandwidth before/after); fusing residual add + RMSNorm (bytes moved, time); every serving "
              "iteration in a CUDA graph (prefill chunks as decode rows, token buckets; the serving benchmark "
              "with and without graphs); split-KV work-assignment widget. Runs everywhere; stored outputs "
              "from an H200",
        assignment="07_performance/performance.ipynb",
        implements="operator fusion: the residual add + RMSNorm as one Triton kernel (2 reads + 2 writes); "
                   "the split-KV (flash-decoding) merge of partial attention outputs by their log-sum-exps; a "
                   "GPU speed check as an ungraded bonus",
        graded="fused kernel 3, ragged hidden sizes 2, split-KV merge vs full attention 3, empty ranges and "
               "overflow 2",
        widgets=("decode_view.SplitKVView",),
        without_triton="the split-KV paged decode kernel and the fused residual add + RMSNorm kernel are not "
                       "run; the log-sum-exp merge runs in PyTorch and every GPU measurement is read from "
                       "stored results",
        assignment_without_triton="the fused-kernel part is \"not gradable on this machine\"; the split-KV "
                                  "merge is graded",
        results=("decode_profile", "decode_step", "fusion", "operator_classes", "paged_attention", "serving",),
    ),
    Lesson(
        number=8, slug="08_parallelism", title="parallelism",
        lectures="001, 003",
        builds="data, tensor, pipeline and sequence parallelism on real `torch.distributed` process groups, "
               "equal to one device",
        topic="inter- vs intra-operator parallelism (the slide's trade-off table); data parallel with "
              "all-reduce vs a parameter server, a ring all-reduce from send/recv (2(N-1)/N bytes per rank); "
              "ZeRO stages and a sharded optimizer; Megatron tensor parallelism (Y = X·W1·W2 with one "
              "all-reduce, a tensor-parallel Llama block); GPipe and 1F1B pipelines with the measured bubble "
              "vs (p-1)/(m+p-1); Ulysses and Ring Attention; every result equal to one device's, on real "
              "gloo/NCCL process groups; pipeline-schedule widget. Runs everywhere (gloo on a CPU); stored "
              "outputs from one H200 (NCCL multi-GPU figures need a 2-GPU machine)",
        assignment="08_parallelism/parallelism.ipynb",
        implements="a ring all-reduce from point-to-point send/recv, weight sharding, a column- then "
                   "row-parallel MLP (one all-reduce), data-parallel gradients all-reduced in buckets from "
                   "backward hooks (a tied and a frozen weight), graded on real gloo ranks",
        graded="ring all-reduce 3, shards 2, tensor-parallel MLP 3, DDP buckets 2",
        widgets=("pipeline_view.PipelineView",),
    ),
    Lesson(
        number=9, slug="09_moe", title="mixture of experts",
        lectures="003",
        builds="router, top-k, capacity and dropped tokens, expert vs tensor parallelism on real process "
               "groups, checked against Mixtral and Qwen2-MoE",
        topic="Mixture of Experts: the slide's two-expert formula by hand; the MoE layer equal to "
              "`transformers`' Mixtral and Qwen2-MoE blocks (forward and gradients; renormalised vs raw top-k "
              "weights, a shared expert) with loop, sorted and Triton grouped-GEMM dispatch; routing of a "
              "small trained MoE (llmsys-tiny-moe) on held-out text: per-expert load, which tokens go where; "
              "capacity factor vs dropped tokens and loss; the scaling argument in numbers (Mixtral-8x7B, "
              "Qwen1.5-MoE vs dense models of equal FLOPs/token); expert vs tensor parallelism on gloo ranks "
              "with bytes counted (TP sends N/k times more); dispatch benchmark against `transformers`; "
              "potential problems measured (imbalance, all-to-all time, memory, router-logit growth and the "
              "z-loss); routing widget. Runs everywhere; stored outputs from an H200",
        assignment="09_moe/moe.ipynb",
        implements="the router (softmax in float32, top-k, renormalised as on the slide or not, Qwen2-MoE's "
                   "`norm_topk_prob`), the stable sort of token-to-expert assignments, sorted "
                   "dispatch/combine (one SwiGLU per expert slice, un-permute, weighted sum), the layer, the "
                   "Switch/Mixtral load-balancing loss (with a padding mask); graded against the kit's "
                   "`llmsys_lab.moe` and `transformers`' `MixtralSparseMoeBlock`, `Qwen2MoeSparseMoeBlock` "
                   "and `load_balancing_loss_func`, forward and gradients, with ties, k = 1, k = E and an "
                   "expert that gets no token",
        graded="router 2, edge cases 1, sort 1, dispatch 2, Mixtral block 2, load-balancing loss 2",
        widgets=("routing_view.RoutingView",),
        without_triton="the Triton grouped-GEMM dispatch is not run; the loop and sorted dispatches are",
        results=("moe",),
    ),
    Lesson(
        number=10, slug="10_speculative_decoding", title="speculative decoding",
        lectures="000 (outline)",
        builds="draft, verify, accept/reject and KV rollback, exact; the speed-up model against GPU "
               "measurements",
        topic="why decode is slow (one memory-bound step per token); draft, verify, accept/reject with "
              "modified rejection sampling, rollback of the contiguous and paged KV caches; greedy and "
              "sampled exactness checked; acceptance rate and the expected speed-up (1-α^(γ+1))/((1-α)(γc+1)) "
              "vs measured across γ; a trained draft model and prompt-lookup drafting; where it stops paying; "
              "draft/verify step-through widget",
        assignment="10_speculative_decoding/speculative.ipynb",
        implements="the verify step (modified rejection sampling), KV rollback, the greedy draft-verify loop",
        graded="greedy verify 2, distribution test 3, rollback 2, greedy loop 3",
        widgets=("speculative_view.SpeculativeView",),
        results=("speculative",),
    ),
    Lesson(
        number=11, slug="11_scaling_laws", title="scaling laws",
        lectures="003",
        pending=True,
        builds="train a family of small models, fit Chinchilla's law, the compute-optimal model for a budget; "
               "depth vs width, transformers vs LSTMs",
        topic="what a scaling law is (the error of a mean, $\\sigma^2/n$, slope −1, by simulation); "
              "mathematics vs physics; a family of small Llama models (the kit's `LlamaLM`, several widths "
              "and depths, IsoFLOP token budgets) trained on bundled Shakespeare tokens with the kit's one "
              "training loop (the stored CPU family, `scripts/train_scaling_family.py`, and three runs "
              "trained live); Chinchilla's approach 3 (Huber on log-loss, L-BFGS from a grid, bootstrap over "
              "runs) and approach 2 (IsoFLOP parabolas); $N^*(C)$, $D^*(C)$ under $C = 6ND$ beside the "
              "slide's law and Chinchilla's; where a toy corpus bends the law; depth vs width; transformers "
              "vs LSTMs; Rosenfeld's and Kaplan's forms (Kaplan et al. is 2020, its form corrected); "
              "attention's $s^2$ share; budget explorer widget. Runs everywhere; stored outputs from a CPU "
              "run until its GPU reference run",
        assignment="11_scaling_laws/scaling_laws.ipynb",
        implements="a Chinchilla approach-3 fit of $L(N, D) = E + A/N^\\alpha + B/D^\\beta$ to training runs "
                   "(Huber on log-loss, `torch.optim`), the compute-optimal $N^*$, $D^*$ for a budget, \"train "
                   "longer\" or \"train bigger\" for two budgets; graded with tolerances against the kit's "
                   "`llmsys_lab.scaling` fit and formulas, with hidden runs and laws",
        graded="fit 4, compute-optimal 3, longer or bigger 3",
        widgets=("scaling_view.ScalingView",),
        results=("scaling_family",),
    ),
    Lesson(
        number=12, slug="12_deepseek_v3", title="DeepSeek-V3",
        lectures="002, 003 (outline)",
        pending=True,
        builds="connecting the dots: counts, MLA and its latent cache, DeepSeek's routing and loss-free "
               "balancing, disaggregated serving, MTP as speculative decoding, checked against `transformers`",
        topic="connecting the dots on DeepSeek-V3: its published shape counted exactly (671,026,404,352 "
              "parameters, equal to `transformers`' `DeepseekV3ForCausalLM` on the meta device; 37.6B "
              "activated; the MTP module and the report's 671B / 685B), FLOPs per token and the pre-training "
              "MFU implied by the report's GPU hours, weights and training state in BF16 and FP8; multi-head "
              "latent attention (`llmsys_lab.deepseek.MLA`) equal to `DeepseekV3Attention` (forward, "
              "gradients, cache), its latent KV cache and the absorbed decode, cache bytes per token beside "
              "MHA, GQA and MQA and the max batch that follows; DeepSeek's routing in the kit's MoE layer "
              "(sigmoid, scaled, node-limited, biased; equal to `DeepseekV3MoE`), node-limited all-to-all "
              "bytes, auxiliary-loss-free balancing measured on llmsys-tiny-moe against the auxiliary loss; "
              "prefill/decode deployments per GPU and the disaggregated goodput; MTP as speculative decoding "
              "(lesson 10's formula vs the reported 1.8x). Runs everywhere; stored outputs from a CPU run "
              "until its GPU reference run",
        assignment="12_deepseek_v3/deepseek_v3.ipynb",
        implements="MLA's latent KV cache, the absorbed attention (never building per-head K/V), one MLA step "
                   "with both; graded against a materialised specification, the kit's `llmsys_lab.deepseek` "
                   "and `transformers`' `DeepseekV3Attention` with its own cache (prefill + decode, with and "
                   "without a query latent)",
        graded="latent cache 3, absorbed attention 4, MLA step vs `transformers` 3",
    ),
)


# ---- the lists other parts of the kit read ---------------------------------------------------------
def lesson(number: int, lessons=None) -> Lesson:
    for item in LESSONS if lessons is None else lessons:
        if item.number == number:
            return item
    raise KeyError(f"no lesson number {number!r} in the course manifest")


def lesson_notebooks(lessons=None, root: Path = ROOT, pending: bool = True) -> list[Path]:
    """Every lesson notebook in order (the pending ones last, as they sit in notebooks/pending/)."""
    lessons = LESSONS if lessons is None else lessons
    return [root / x.notebook for x in lessons if not x.pending] + \
        ([root / x.notebook for x in lessons if x.pending] if pending else [])


def solution_notebooks(lessons=None, root: Path = ROOT) -> list[Path]:
    return [root / x.solution for x in (LESSONS if lessons is None else lessons) if x.assignment]


def assignment_names(lessons=None) -> list[str]:
    """"NN_name/notebook.ipynb" of every assignment, in lesson order."""
    return [x.assignment for x in (LESSONS if lessons is None else lessons) if x.assignment]


def without_triton(lessons=None) -> list[tuple[str, str]]:
    """(where, what is limited) for every lesson, then every assignment, that runs a Triton kernel."""
    lessons = LESSONS if lessons is None else lessons
    return ([(f"lesson {x.number:02d}", x.without_triton) for x in lessons if x.without_triton]
            + [(f"assignment {x.number:02d}", x.assignment_without_triton) for x in lessons
               if x.assignment_without_triton])


def _check(lessons) -> None:
    numbers = [x.number for x in lessons]
    if numbers != sorted(set(numbers)):
        raise ValueError(f"course manifest: lesson numbers must be unique and in order, got {numbers}")


_check(LESSONS)
