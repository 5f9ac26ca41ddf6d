"""The tokens -> experts routing view over the bundled llmsys-tiny-moe, and the model itself."""
import json
import re

import pytest
import torch

from llmsys_lab.model import LlamaLM
from llmsys_lab.moe import TINY_MOE_PATH, MoE, capacity, load_tiny_moe
from llmsys_lab.presets import get_preset
from llmsys_lab.validate import ConfigError
from llmsys_lab.viz.routing_view import RoutingView

TEXT = "ROMEO.\nBut soft, what light through yonder window breaks?"


@pytest.fixture(scope="module")
def tiny_moe():
    return load_tiny_moe()


@pytest.fixture
def view(tiny_moe):
    model, tok = tiny_moe
    return RoutingView.record(model, tok, TEXT, layer=1)


def test_bundled_moe_loads_in_transformers_and_converts(tiny_moe):
    from transformers import AutoModelForCausalLM

    model, tok = tiny_moe
    hf = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM" and hf.config.num_local_experts == 8
    assert hf.config.num_experts_per_tok == 2 and hf.config.vocab_size == len(tok)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4
    card = json.loads((TINY_MOE_PATH / "training_log.json").read_text())
    assert card["steps"] >= 1 and len(card["per_expert_load"]) == hf.config.num_hidden_layers
    assert max(card["checks"].values()) < 1e-3
    assert all(abs(sum(layer["fraction"]) - 1) < 1e-3 for layer in card["per_expert_load"])


def test_view_routes_exactly_as_the_layer(tiny_moe, view):
    model, tok = tiny_moe
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids)
    layer = [m for m in model.modules() if isinstance(m, MoE)][1]
    assert view.capacity_factor == 1.0 and view.top_k == 2
    view.set(capacity_factor=None)
    assert torch.equal(view.routing.experts, layer.last_routing.experts)
    assert torch.allclose(view.routing.weights, layer.last_routing.weights)
    n = ids.shape[1]
    assert len(view.tokens) == n and sum(view.stats["routed"]) == 2 * n and sum(view.stats["dropped"]) == 0
    text = view.text()
    assert text.startswith("layer 1 of 4, top-2, capacity factor none (no limit): every assignment kept")
    assert len(re.findall(r"->\d", text)) == n                       # every token listed, none left out


def test_capacity_factor_drops_assignments_over_capacity(view):
    n = len(view.tokens)
    view.set(capacity_factor=0.5)
    cap = capacity(n, 8, 2, 0.5)
    assert view.capacity == cap and max(view.stats["kept"]) <= cap
    dropped = sum(view.stats["dropped"])
    assert dropped == sum(max(0, r - cap) for r in view.stats["routed"]) > 0
    assert f"capacity {cap} assignments per expert = ceil(0.50 x {n} tokens x 2 / 8 experts)" in view.text()
    assert f"dropped {dropped} of {2 * n} assignments" in view.text()
    assert len(re.findall(r"\dx\(", view.text())) == dropped           # each dropped choice is marked in the token list
    view.set(capacity_factor=8.0)                         # E / k or more: room for every assignment
    assert sum(view.stats["dropped"]) == 0
    view.set(top_k=1, capacity_factor=1.0)
    assert sum(view.stats["routed"]) == n and view.routing.weights.eq(1).all()   # top-1 renormalised: weight 1


def test_widget_controls_drive_the_view(view):
    box = view.widget()
    (topk, cf), image, table = box.children[0].children, box.children[1], box.children[3]
    png, before = image.value, table.value
    topk.value = "1"
    assert view.top_k == 1 and "top-1, capacity factor 1.00" in table.value and image.value != png
    cf.value = 0.5
    assert view.capacity_factor == 0.5 and "capacity factor 0.50" in table.value and table.value != before
    view.set(top_k=2, capacity_factor=1.0)                # state set from code moves the controls
    assert (topk.value, cf.value) == ("2", 1.0)
    assert view._repr_mimebundle_()["text/plain"] == view.text()
    assert "llmsys-routing-view" in box._dom_classes


@pytest.mark.parametrize("change, msg", [
    (dict(top_k=0), r"top_k must be an int in 1\.\.8, got 0"),
    (dict(top_k=9), r"top_k must be an int in 1\.\.8, got 9"),
    (dict(capacity_factor=0.0), "capacity_factor must be > 0"),
])
def test_bad_settings_are_named_and_leave_the_view_unchanged(view, change, msg):
    text = view.text()
    with pytest.raises(ConfigError, match=msg):
        view.set(**change)
    assert view.text() == text


def test_bad_model_or_layer_is_named(tiny_moe):
    model, tok = tiny_moe
    with pytest.raises(ConfigError, match=r"layer must be in 0\.\.3, got 4"):
        RoutingView.record(model, tok, TEXT, layer=4)
    dense = LlamaLM(get_preset("llmsys-tiny"))
    with pytest.raises(ConfigError, match="has no llmsys_lab.moe.MoE layer"):
        RoutingView.record(dense, tok, TEXT)
    with pytest.raises(ConfigError, match=r"x must be \(tokens, hidden\) = \(2, 128\)"):
        RoutingView(["a", "b"], torch.zeros(3, 128), torch.zeros(8, 128))


def test_missing_bundled_model_names_the_training_command(monkeypatch, tmp_path):
    import llmsys_lab.moe as moe

    monkeypatch.setattr(moe, "TINY_MOE_PATH", tmp_path / "llmsys-tiny-moe")
    with pytest.raises(FileNotFoundError, match="scripts/train_tiny_moe.py"):
        moe.load_tiny_moe()
