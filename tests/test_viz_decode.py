import pytest

from llmsys_lab.kernels.paged_attention import choose_num_splits
from llmsys_lab.viz.decode_view import Assignment, SplitKVView


def test_batch_one_leaves_the_sms_idle_and_splits_fill_them():
    view = SplitKVView(batch=1, splits=1)
    text = view.text()
    assert text.startswith("batch 1 x 8 KV heads x 1 split = 8 programs on 132 SMs")
    assert "SMs busy in the first wave: 8 of 132 (6%)" in text and "merge: none" in text
    view.set_splits(16)
    text = view.text()
    assert "= 128 programs" in text and "128 of 132 (97%)" in text
    assert "each program reads 256 of the 4096 cached tokens (4 tiles of 64)" in text
    assert "critical path 64 -> 4 tiles (16.0x shorter" in text
    assert "merge: 32 (sequence, query head) pairs, each combining 16 partial outputs" in text
    assert f"choose_num_splits picks {choose_num_splits(1, 8, 4096, 132)} for this shape" in text


def test_large_batch_needs_no_split():
    view = SplitKVView(batch=64, splits=16)
    a = view.assignment
    assert a.programs == 64 * 8 * 16 and a.waves == 63 and "choose_num_splits picks 1" in view.text()
    one = Assignment(64, 8, 4096, 1, 132, 64)
    assert one.waves == 4 and one.critical_path == 256 and a.critical_path == 252   # splitting gains ~nothing


def test_program_order_matches_the_kernel_grid():
    a = Assignment(2, 8, 1024, 4, 132, 64)       # grid (B, H_kv, S): the split index varies fastest
    assert [a.program(i) for i in (0, 1, 4, 32, 63)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 7, 3)]


def test_widget_controls_drive_the_state():
    view = SplitKVView(batch=1, splits=1)
    box = view.widget()
    (batch, splits), image, table = box.children[0].children, box.children[1], box.children[2]
    assert "8 programs" in table.value and image.value[:4] == b"\x89PNG"
    splits.value = 8
    assert view.splits == 8 and "64 programs" in table.value
    before = image.value
    batch.value = "16"
    assert view.batch == 16 and table.value.count("batch 16 x 8 KV heads x 8 splits") == 1
    assert image.value != before
    view.set_splits(2)                               # state set from code moves the controls
    assert splits.value == 2
    assert view._repr_mimebundle_()["text/plain"] == view.text()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"batch must be one of \(1, 2, 4"):
        SplitKVView(batch=3)
    with pytest.raises(ValueError, match=r"splits must be an int in 1..32, got 0"):
        SplitKVView(splits=0)
    with pytest.raises(ValueError, match="kv_heads = 3 must divide heads = 32"):
        SplitKVView(kv_heads=3)
    with pytest.raises(ValueError, match="context must be a positive int"):
        SplitKVView(context=0)
