"""The engine runs the model's one forward pass (through LlamaBlock and its attention module) on a
packed paged batch, keeps its device-side block tables equal to the BlockManager's, and replays every
iteration (prefill, decode or both) from CUDA graphs on a GPU with the same tokens as eager execution."""
import pytest
import torch

from llmsys_lab.cuda_graphs import bucket_for, decode_buckets, graph_buckets, padded_stage, paged_rows
from llmsys_lab.engine import Engine, serve
from llmsys_lab.forward_batch import KVLayout, PackedPagedBatch
from llmsys_lab.generate import generate
from llmsys_lab.kv_cache import KVCache
from llmsys_lab.layers import LlamaBlock
from llmsys_lab.paged_cache import PagedBatch, PagedKVCache
from llmsys_lab.validate import ShapeError

TEXTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords, I pray you", "HAMLET.\nWhat", "JULIET.\nO Romeo",
         "FIRST CITIZEN.\nWe are", "PORTIA.\nThe quality of mercy"]


# `tiny` and `ktiny` (the bundled model, where the paged kernel runs): tests/conftest.py
@pytest.fixture(scope="module")
def prompts(tiny, tiny_prompts):
    assert [tiny[1](t).input_ids for t in TEXTS] == tiny_prompts
    return tiny_prompts


# ---- one forward pass -----------------------------------------------------------------------------

def test_every_layout_implements_the_kv_interface():
    assert issubclass(KVCache, KVLayout) and issubclass(PagedBatch, KVLayout) and issubclass(PackedPagedBatch, KVLayout)
    assert PackedPagedBatch.packed and not KVCache.packed and not PagedBatch.packed


@pytest.mark.parametrize("use_kernel", [False, pytest.param(True, marks=pytest.mark.interpreter)])
def test_the_engine_runs_the_models_forward_pass_through_its_blocks(ktiny, prompts, use_kernel):
    """Forward hooks on the model, every LlamaBlock and every attention module see each iteration once,
    with the packed (1, N, hidden) row and the engine's PackedPagedBatch as the KV layout; the tokens
    equal generating alone. (The engine used to run its own copy of the layers: the hooks never fired.)
    On the kernel path every packed token is a paged-attention row and gets logits (N of them; the
    engine reads each request's last); on the padded path only each request's last row does (R)."""
    model, _ = ktiny
    seen = {"model": [], "block": [], "attn": []}

    def on_model(mod, args, kwargs, out):
        seen["model"].append((tuple(args[0].shape), type(kwargs["kv_cache"]).__name__, tuple(out.shape)))

    def on_block(name):
        def hook(mod, args, kwargs, out):
            seen[name].append((tuple(args[0].shape), type(kwargs["kv_cache"]).__name__, kwargs["layer_idx"]))
        return hook

    handles = [model.register_forward_hook(on_model, with_kwargs=True)]
    for layer in model.model.layers:
        assert isinstance(layer, LlamaBlock)
        handles.append(layer.register_forward_hook(on_block("block"), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(on_block("attn"), with_kwargs=True))
    try:
        engine = Engine(model, num_blocks=40, block_size=4, max_batch=2, eos_token_id=None, use_kernel=use_kernel)
        for i, p in enumerate(prompts[:2]):
            engine.add_request(i, p, 3)
        done = {r.id: r for r in engine.run()}
    finally:
        for h in handles:
            h.remove()
    layers = len(model.model.layers)
    iterations = len(engine.log)
    assert iterations == 3 and [x["graph"] for x in engine.log] == [False] * 3     # hooks: never a graph
    assert len(seen["model"]) == iterations
    assert len(seen["block"]) == len(seen["attn"]) == iterations * layers
    hidden = model.config.hidden_size
    for it, (x, entry) in enumerate(zip(seen["model"], engine.log)):
        n, r = entry["tokens"], entry["requests"]
        assert x == ((n,), "PackedPagedBatch", (n if use_kernel else r, model.config.vocab_size))
        for li in range(layers):
            assert seen["block"][it * layers + li] == ((1, n, hidden), "PackedPagedBatch", li)
            assert seen["attn"][it * layers + li] == ((1, n, hidden), "PackedPagedBatch", li)
    for i, p in enumerate(prompts[:2]):
        assert done[i].output == generate(model, [p], 3, eos_token_id=None).new_tokens[0]


def test_the_models_packed_entry_refuses_a_batch_shaped_input(tiny):
    model, _ = tiny
    engine = Engine(model, num_blocks=8, block_size=4)
    rows = torch.zeros(3, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="attends one way"):
        PackedPagedBatch(engine.cache, torch.arange(3), torch.arange(3))           # no attention given
    with pytest.raises(TypeError, match="prefill must be a PaddedPrefill, got tuple"):
        PackedPagedBatch(engine.cache, torch.arange(3), torch.arange(3), prefill=(1, 2, 3, 4))
    batch = PackedPagedBatch(engine.cache, torch.arange(3), torch.arange(3), block_tables=rows,
                             context_lens=torch.arange(1, 4, dtype=torch.int32), decode_attention=lambda *a: a[0])
    with pytest.raises(ShapeError, match=r"packed \(N,\) token ids"):
        model(torch.tensor([[1, 2, 3]]), kv_cache=batch)
    with pytest.raises(ShapeError, match="2 token ids for a packed batch of 3 tokens"):
        model(torch.tensor([1, 2]), kv_cache=batch)
    with pytest.raises(ValueError, match="pass no attention_mask"):
        model(torch.tensor([1, 2, 3]), attention_mask=torch.ones(1, 3), kv_cache=batch)


# ---- incremental device-side block tables --------------------------------------------------------

@pytest.mark.interpreter
def test_device_block_tables_follow_the_block_manager_through_preemption(ktiny, prompts):
    """Rows are uploaded only when a table changed, yet in every iteration each decoding request's
    device row holds the blocks its context was read from (a block added after the forward is sent
    before the next one); preempted and finished requests give their rows back.
    (Decode rows on the kernel path: the Triton interpreter on a CPU.) Tokens equal generating alone."""
    model, _ = ktiny
    limits = [6, 8, 13, 6]
    engine = Engine(model, num_blocks=11, block_size=2, max_batch=2, token_budget=16, use_kernel=True)
    reqs = [engine.add_request(f"r{i}", prompts[i], n, arrival_step=t)
            for i, (n, t) in enumerate(zip(limits, [1, 3, 4, 4]))]
    uploads = 0
    while engine.scheduler.has_work:
        before = {r: v[1] for r, v in engine._uploaded.items()}
        engine.step()
        uploads += sum(1 for r, v in engine._uploaded.items() if before.get(r) != v[1])
        for r, row in engine._row.items():      # decoded this iteration, over its tokens but the newest
            read = engine.blocks.blocks_needed(r.num_tokens - 1)
            assert engine._tables[row, :read].tolist() == engine.blocks.table(r.id).blocks[:read], r.id
        assert len(engine._row) + len(engine._free_rows) == 2
        assert set(engine._row) <= set(engine.scheduler.running)
    assert sum(r.preemptions for r in reqs) > 0, "a check of the workload: it preempts"
    assert not engine._row and sorted(engine._free_rows) == [0, 1]
    decode_rows = sum(len(x["schedule"]["decode"]) for x in engine.log)
    assert 0 < uploads < decode_rows                   # uploads follow new blocks, not every decode row
    for i, r in enumerate(reqs):
        assert r.output == generate(model, [prompts[i]], limits[i]).new_tokens[0][:len(r.output)]


@pytest.mark.interpreter
def test_one_token_chunks_in_the_middle_of_a_prompt_see_only_their_prefix(ktiny):
    """With chunked prefill and a budget of 2, a request decoding beside a prefilling one leaves the
    latter one token per iteration: one-token rows that are not decode rows. On the kernel path such a
    row reads s + 1 keys, not the whole prompt's (whose later slots are not written yet): the tokens
    equal generating alone. (Before the packed batch the engine gave the kernel the table's length
    and request "b" came out wrong.)"""
    model, tok = ktiny
    p0, p1 = tok("ROMEO.\n").input_ids, tok("KING.\nMy lords, I pray you").input_ids
    engine = Engine(model, num_blocks=40, block_size=4, max_batch=2, token_budget=2, chunked_prefill=True,
                    use_kernel=True, eos_token_id=None)
    a = engine.add_request("a", p0, 12)
    b = engine.add_request("b", p1, 4, arrival_step=3)
    list(engine.run())
    assert any(x["schedule"]["prefill"] == [("b", 1)] and x["schedule"]["decode"] == ["a"] for x in engine.log)
    assert a.output == generate(model, [p0], 12, eos_token_id=None).new_tokens[0]
    assert b.output == generate(model, [p1], 4, eos_token_id=None).new_tokens[0]


# ---- CUDA graphs: settings and buckets -------------------------------------------------------------

def test_decode_buckets():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_buckets(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert decode_buckets(8) == [1, 2, 4, 8] and decode_buckets(5) == [1, 2, 4, 5] and decode_buckets(1) == [1]
    assert [bucket_for([1, 2, 4, 8], n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="does not fit the buckets"):
        bucket_for([1, 2, 4], 5)
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        decode_buckets(0)


def test_graph_buckets_grow_by_a_quarter_octave_past_the_decode_batches():
    assert graph_buckets(8) == decode_buckets(8)
    assert graph_buckets(8, 8) == [1, 2, 4, 8]
    assert graph_buckets(8, 200) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 200]
    big = graph_buckets(256, 4096)
    assert big[:20] == decode_buckets(256) and big[20:24] == [320, 384, 448, 512] and big[-2:] == [3584, 4096]
    # padding past the decode batches is at most a quarter of the iteration
    assert all(b / a <= 1.25 for a, b in zip(big[19:], big[20:]))
    assert [bucket_for(big, n) for n in (257, 320, 321, 4000)] == [320, 320, 384, 4096]
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        graph_buckets(8, 0)


def test_an_iteration_is_paged_rows_one_per_token_with_its_causal_context():
    """A prefill chunk of 3 tokens at positions 4..6 (table row 2) and a decode token at position 9
    (table row 0): four rows, each seeing the keys up to and including its own position."""
    tokens, lens, rows, last = paged_rows([([11, 12, 13], 4, 2), ([7], 9, 0)])
    assert (tokens, lens, rows, last) == ([11, 12, 13, 7], [5, 6, 7, 10], [2, 2, 2, 0], [2, 3])
    assert padded_stage(tokens, lens, rows, 8, [0, 1, 9])[:, 4:].tolist() == [[0] * 4, [1] * 4, [9] * 4]
    with pytest.raises(ValueError, match=r"a chunk with no tokens \(table row 3\)"):
        paged_rows([([1], 0, 0), ([], 5, 3)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults")
def test_graphs_are_off_on_a_cpu_by_default(tiny, prompts):
    engine, _ = serve(tiny[0], prompts[:2], 3, num_blocks=20, block_size=4)
    assert engine.cuda_graphs is False and engine.graph_buckets == [] and engine.graphs is None
    assert [x["graph"] for x in engine.log] == [False] * len(engine.log)


@pytest.mark.parametrize("kw,msg", [
    (dict(cuda_graphs=True), r"cuda_graphs=True needs the model on a CUDA GPU, but it is on cpu"),
    (dict(cuda_graphs="yes"), r"cuda_graphs must be True, False or None"),
    (dict(num_splits=0), r"num_splits must be None \(chosen per batch bucket\) or an int >= 1, got 0"),
    (dict(num_splits=True), r"num_splits must be None"),
    (dict(max_batch=8, max_graph_tokens=4), r"max_graph_tokens must be an int >= max_batch = 8"),
    (dict(max_graph_tokens=2.5), r"max_graph_tokens must be an int"),
])
def test_bad_engine_settings_are_refused_with_a_reason(tiny, kw, msg):
    model = tiny[0]
    with pytest.raises(ValueError, match=msg):
        Engine(model, num_blocks=8, block_size=4, **kw)


@pytest.mark.interpreter
def test_padding_rows_of_a_decode_bucket_touch_only_the_scratch_block(ktiny, prompts):
    """What a graph replays, run eagerly on a CPU (the paged kernel in the interpreter): a decode batch
    of 3 rows padded to a bucket of 4 gives the 3 rows' tokens and K/V of the unpadded batch, and the
    padding row writes only the scratch block past the pool."""
    model, _ = ktiny
    engine = Engine(model, num_blocks=30, block_size=4, max_batch=4, eos_token_id=None, use_kernel=True,
                    cuda_graphs=False)
    # the graphed engine's set-up: one scratch block past the pool, the padding row of the tables on it
    engine.cache = PagedKVCache(model.config, engine.blocks, model.lm_head.weight.dtype, model.lm_head.weight.device,
                                scratch_blocks=1)
    engine._tables[4] = 30
    for i, p in enumerate(prompts[:3]):
        engine.add_request(i, p, 5)
    engine.step()                                                       # the prefill
    reqs = engine.scheduler.running
    tokens, lens = [r.output[-1] for r in reqs], [r.num_tokens for r in reqs]
    rows = [engine._table_row(r) for r in reqs]
    dev = model.lm_head.weight.device
    plain = engine._step(padded_stage(tokens, lens, rows, 3, [0, 1, 4]).to(dev)).argmax(-1).tolist()   # _step gives logits
    k_plain = engine.cache.k.clone()
    assert not k_plain[:, 30].any()                                     # nothing in the scratch block yet
    stage = padded_stage(tokens, lens, rows, 4, [0, 1, 4])
    assert stage[:, 3].tolist() == [0, 1, 4]
    padded = engine._step(stage.to(dev)).argmax(-1).tolist()
    assert padded[:3] == plain
    torch.testing.assert_close(engine.cache.k[:, :30], k_plain[:, :30], atol=1e-5, rtol=1e-5)
    assert engine.cache.k[:, 30, 0].any() and not engine.cache.k[:, 30, 1:].any()   # slot 0 of the scratch block
    with pytest.raises(ValueError, match="5 rows do not fit a bucket of 4"):
        padded_stage([1] * 5, [1] * 5, [0] * 5, 4, [0, 1, 4])


# ---- CUDA graphs on a GPU ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_model():
    from llmsys_lab.model import LlamaLM

    return LlamaLM.from_pretrained(device="cuda")


def _serve_workload(model, prompts, **kw):
    """8 requests of different lengths, the last arriving later: decode batches of 7, 6, ..., 1 rows
    (partially filled buckets of 8, 4 and 2, and full ones), a prefill of 7 prompts, and a mixed
    iteration that prefills the latecomer beside the decoding requests."""
    engine = Engine(model, num_blocks=120, block_size=4, max_batch=8, eos_token_id=None, token_budget=64, **kw)
    limits = [3, 6, 9, 12, 15, 18, 21, 10]
    arrivals = [0, 0, 0, 0, 0, 0, 0, 8]
    for i, (p, n, t) in enumerate(zip(prompts + prompts[1:2], limits, arrivals)):
        engine.add_request(i, p, n, arrival_step=t)
    done = {r.id: r for r in engine.run()}
    assert sorted(done) == list(range(8)) and all(len(done[i].output) == limits[i] for i in range(8))
    return engine, [done[i].output for i in range(8)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (captures and replays CUDA graphs)")
@pytest.mark.parametrize("num_splits", [1, None])
def test_cuda_graph_replay_gives_the_tokens_of_eager_decode(gpu_model, prompts, num_splits):
    graphed, g_out = _serve_workload(gpu_model, prompts, cuda_graphs=True, num_splits=num_splits)
    eager, e_out = _serve_workload(gpu_model, prompts, cuda_graphs=False, num_splits=num_splits)
    assert Engine(gpu_model, num_blocks=8, block_size=4).cuda_graphs is True        # the default on a GPU
    assert graphed.cuda_graphs and graphed.graph_buckets == [1, 2, 4, 8, 16, 32, 48, 64] and not eager.cuda_graphs
    assert g_out == e_out                                                           # every request, every token
    # every iteration was replayed: the prefill, the decodes and the mixed one
    assert all(x["graph"] for x in graphed.log)
    mixed = [x for x in graphed.log if x["schedule"]["prefill"] and x["schedule"]["decode"]]
    assert len(mixed) == 1 and graphed.log[0]["schedule"]["prefill"] and not graphed.log[0]["schedule"]["decode"]
    sizes = {len(x["schedule"]["decode"]) for x in graphed.log if not x["schedule"]["prefill"]}
    assert {7, 6, 5, 3, 1} <= sizes                                 # partially filled buckets of 8 and 4
    tokens = {x["tokens"] for x in graphed.log}
    assert graphed.graphs.captured == sorted({bucket_for(graphed.buckets, n) for n in tokens})
    assert not any(x["graph"] for x in eager.log)
    # padding rows wrote only to the scratch block: the real blocks hold what eager decoding wrote
    n = graphed.blocks.num_blocks
    assert graphed.cache.k.shape[1] == n + 1 and eager.cache.k.shape[1] == n
    torch.testing.assert_close(graphed.cache.k[:, :n], eager.cache.k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(graphed.cache.v[:, :n], eager.cache.v, atol=1e-4, rtol=1e-4)
    assert bool(graphed.cache.k[:, n].abs().sum() > 0)                # ... which got the padding rows' K
    # and the tokens are those of generating each prompt alone
    for i, out in enumerate(g_out[:3]):
        assert out == generate(gpu_model, [prompts[i]], len(out), eos_token_id=None).new_tokens[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (captures and replays CUDA graphs)")
def test_an_iteration_with_a_forward_hook_runs_eagerly(gpu_model, prompts):
    """A replay would skip hooks: with one registered the engine runs the iteration eagerly instead."""
    calls = []
    handle = gpu_model.model.embed_tokens.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    try:
        engine, _ = _serve_workload(gpu_model, prompts, cuda_graphs=True)
    finally:
        handle.remove()
    assert engine.cuda_graphs and not any(x["graph"] for x in engine.log)
    assert len(calls) == len(engine.log)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (captures and replays CUDA graphs)")
def test_graphs_captured_up_front_and_an_iteration_past_the_largest_bucket_runs_eagerly(gpu_model, prompts):
    """capture_graphs() captures every bucket before the first request (padding rows only: no block
    but the scratch block is written); with max_graph_tokens=8 the 7-prompt prefill is too large for
    a graph and runs eagerly, the decode iterations are replayed, and the tokens equal eager decoding."""
    def workload(**kw):
        engine = Engine(gpu_model, num_blocks=120, block_size=4, max_batch=8, eos_token_id=None, token_budget=64,
                        max_graph_tokens=8, **kw)
        before = engine.cache.k[:, :120].clone()
        seconds = engine.capture_graphs()
        assert seconds >= 0 and torch.equal(engine.cache.k[:, :120], before)
        for i, p in enumerate(prompts):
            engine.add_request(i, p, 6)
        done = {r.id: r.output for r in engine.run()}
        return engine, [done[i] for i in range(len(prompts))]

    graphed, g_out = workload(cuda_graphs=True)
    eager, e_out = workload(cuda_graphs=False)
    assert graphed.graph_buckets == [1, 2, 4, 8] and graphed.graphs.captured == [1, 2, 4, 8]
    assert eager.graphs is None and eager.capture_graphs() == 0.0 and eager.capture_seconds == 0.0
    assert [x["graph"] for x in graphed.log] == [x["tokens"] <= 8 for x in graphed.log]
    assert not graphed.log[0]["graph"] and graphed.log[0]["tokens"] > 8
    assert g_out == e_out


# ---- compiled iterations ------------------------------------------------------------------------------------

@pytest.mark.interpreter
def test_the_paged_kernel_is_an_operator_compile_can_keep(ktiny):
    """llmsys_lab::paged_decode passes torch.library.opcheck (schema, fake implementation, no aliasing), and a
    compiled function around it (fullgraph: it would raise on a graph break) gives the reference attention."""
    from llmsys_lab.kernels.paged_attention import (_paged_decode_op, paged_attention_decode,
                                                    paged_attention_reference)

    dev = ktiny[0].lm_head.weight.device
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g).to(dev) for s in ((2, 4, 16), (6, 16, 2, 16), (6, 16, 2, 16)))
    tables = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=dev)
    lens = torch.tensor([40, 7], dtype=torch.int32, device=dev)
    torch.library.opcheck(_paged_decode_op, (q, k, v, tables, lens, 0.25, 2, 64, 4, 3),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: paged_attention_decode(*a, check=False, num_splits=2) * 2,
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, tables, lens), 2 * paged_attention_reference(q, k, v, tables, lens),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter
def test_a_compiled_engine_iteration_is_one_graph_with_the_eager_tokens(ktiny, prompts):
    """compile='aot_eager' traces every iteration with fullgraph=True (a graph break raises): the packed batch's
    positions, slots and tables derived on the device, the model, the kernel as an opaque operator. The tokens
    equal the eager engine's; iterations of several sizes share few graphs (one per split count, then sizes
    symbolic)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    def serve_two(**kw):
        engine = Engine(ktiny[0], num_blocks=16, block_size=16, max_batch=2, eos_token_id=None, use_kernel=True, **kw)
        engine.add_request(0, prompts[2], 3)
        engine.add_request(1, prompts[0], 3, arrival_step=1)
        return engine, {r.id: r.output for r in engine.run()}

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    compiled, got = serve_two(compile="aot_eager")
    graphs = counters["stats"]["unique_graphs"] - before
    _, want = serve_two()
    assert got == want and len(got) == 2
    assert len({x["tokens"] for x in compiled.log}) >= 2 and 1 <= graphs <= 3, (compiled.log, graphs)
    with pytest.raises(TypeError, match="compile must be a bool or a TorchDynamo backend name"):
        Engine(ktiny[0], num_blocks=8, block_size=16, compile=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Inductor's Triton code, CUDA graphs)")
def test_compiled_and_graphed_engine_gives_the_tokens_of_eager_decode(gpu_model, prompts):
    """Inductor around the paged kernel, every iteration replayed from a CUDA graph: the eager tokens."""
    compiled, c_out = _serve_workload(gpu_model, prompts, cuda_graphs=True, compile=True)
    _, e_out = _serve_workload(gpu_model, prompts, cuda_graphs=False)
    assert c_out == e_out and all(x["graph"] for x in compiled.log)
