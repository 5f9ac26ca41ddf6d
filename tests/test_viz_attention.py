import pytest
import torch

from llmsys_lab.validate import ShapeError
from llmsys_lab.viz.attention_view import AttentionView

TOKENS = ["The", "cat", "sat", "down"]


def make_view(**kw):
    torch.manual_seed(0)
    return AttentionView(torch.randn(3, 4, 8), torch.randn(3, 4, 8), TOKENS, **kw)


def rows(view):
    return [[float(v) for v in line.split()[1:]] for line in view.text().splitlines()[2:]]


def test_text_table_is_the_state():
    view = make_view()
    table = rows(view)
    assert view.text().splitlines()[0].startswith("head 0 of 3, causal=True")
    assert all(abs(sum(r) - 1) < 0.02 for r in table)
    assert all(table[i][j] == 0 for i in range(4) for j in range(i + 1, 4))
    view.set_causal(False)
    assert any(rows(view)[0][j] > 0 for j in range(1, 4))


def test_widget_controls_change_the_view():
    view = make_view()
    box = view.widget()
    (head, causal), image, table = box.children[0].children, box.children[1], box.children[2]
    before, png_before = table.value, image.value
    assert png_before[:8] == b"\x89PNG\r\n\x1a\n"
    head.value = 2
    assert view.head == 2 and "head 2 of 3" in table.value and table.value != before
    assert image.value != png_before
    causal.value = False
    assert "causal=False" in table.value


def test_bad_input():
    with pytest.raises(ShapeError, match="got 3 tokens for 4 key positions"):
        AttentionView(torch.randn(2, 4, 8), torch.randn(2, 4, 8), TOKENS[:3])
    with pytest.raises(ShapeError, match=r"q must have 3 dims \(H, T, D\)"):
        AttentionView(torch.randn(4, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"head must be in 0..2, got 5"):
        make_view().set_head(5)


def test_plain_text_form_is_the_table():
    view = make_view()
    bundle = view._repr_mimebundle_()
    assert bundle["text/plain"] == view.text()
    assert "application/vnd.jupyter.widget-view+json" in bundle
