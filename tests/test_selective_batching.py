"""llmsys_lab.selective_batching: the packed batch of one engine iteration, observed from outside."""
import pytest

from llmsys_lab.engine import Engine
from llmsys_lab.model import load_tiny
from llmsys_lab.selective_batching import packed_rows, trace_step
from llmsys_lab.scheduler import Request


def test_packed_rows_order_prefill_then_decode():
    a, b, c = Request("a", [1, 2, 3], 2), Request("b", [4], 2), Request("c", [5, 6], 2)
    rows, kinds = packed_rows([(a, 3), (c, 2)], [b])
    assert rows == {"a": range(0, 3), "c": range(3, 5), "b": range(5, 6)}
    assert kinds == {"a": "prefill", "c": "prefill", "b": "decode"}


def test_trace_step_with_nothing_to_run_is_an_error_and_leaves_the_engine_unchanged():
    model, _ = load_tiny()
    engine = Engine(model, num_blocks=8, block_size=4)
    with pytest.raises(RuntimeError, match="scheduled no work"):
        trace_step(engine)
    assert "schedule" not in vars(engine.scheduler)             # the wrapper is gone
    assert not engine.model.model.embed_tokens._forward_hooks   # and so is the hook
    engine.add_request("r", [1, 2, 3], 2)
    packed = trace_step(engine)
    assert packed.shape[0] == 3 and packed.rows == {"r": range(0, 3)} and packed.token_ids == [1, 2, 3]
    assert "[3, " in packed.describe() and "rows 0..2" in packed.describe()
