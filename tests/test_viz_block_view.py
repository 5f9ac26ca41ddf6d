import pytest

from llmsys_lab.kv_utilisation import Request, max_batch, sample_requests, utilisation
from llmsys_lab.viz.block_view import TWO_REQUEST_ORDER, BlockTableView, lecture_events


def test_lecture_state_as_text():
    view = BlockTableView(lecture_events(), order=TWO_REQUEST_ORDER)
    text = view.text()
    assert "block 1  A  computer      scientist     and           mathematician" in text
    assert "block 7  A  Alan          Turing        is            a" in text
    assert "block 3  A  renowned" in text and "block 5  B  future        of            technology" in text
    assert "physical blocks (3 of 8 free)" in text


def test_widget_buttons_and_slider_step_through_events():
    events = lecture_events() + [("free", "A"), ("add", "C", "to be or not".split())]
    view = BlockTableView(events, order=TWO_REQUEST_ORDER, step=0)
    box = view.widget()
    (prev, slider, nxt), html = box.children[0].children, box.children[1]
    assert "every block is free" in html.value
    nxt.click()
    assert slider.value == 1 and "request A arrives" in html.value and view.step == 1
    slider.value = 6
    assert "request A finishes" in view.text() and "(6 of 8 free)" in view.text()
    nxt.click()
    assert "request C" in html.value and view.manager.table("C").blocks == [0]     # the head of the free list
    prev.click()
    assert view.step == 6
    assert view._repr_mimebundle_()["text/plain"] == view.text()


def test_bad_events_and_steps():
    with pytest.raises(ValueError, match=r"step must be in 0..5, got 9"):
        BlockTableView(lecture_events(), step=9)
    with pytest.raises(ValueError, match="unknown event 'grow'"):
        BlockTableView([("grow", "A")])


def test_utilisation_static_vs_paged():
    reqs = [Request(10, 5), Request(3, 1)]
    u = utilisation(reqs, max_len=32, block_size=4)
    # step-by-step token counts: (10..15) and (3, 4) -> 75 + 7 = 82 tokens over 8 request-steps
    assert u.static == pytest.approx(82 / (8 * 32))
    assert u.paged > 0.8 and u.paged_waste_per_seq < 4
    mix = sample_requests(200, seed=0, max_len=1024)
    big = utilisation(mix, 1024, 16)
    assert 0.2 < big.static < 0.4 and big.paged > 0.95          # the lecture's 20-40%; vLLM's ~96%
    static, paged = max_batch(mix, 21_000, 1024, 16)
    assert static == 20 and paged > 2.5 * static
