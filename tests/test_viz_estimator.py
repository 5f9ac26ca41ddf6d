import pytest

from llmsys_lab.validate import ConfigError
from llmsys_lab.viz.estimator_view import EstimatorView


def test_text_follows_the_state():
    view = EstimatorView()
    assert "llama-2-7b: batch 1, seq 4096" in view.text() and "6,738,415,616" in view.text()
    assert "62.99 TF" in view.text()
    view.update(model="opt-13b", seq=2048, dtype="fp16")
    assert "KV cache per token              800.0 KiB" in view.text()


def test_widget_controls_drive_the_view():
    view = EstimatorView()
    box = view.widget()
    (model, dtype, gpu), (batch, seq) = box.children[0].children, box.children[1].children
    image, table = box.children[2], box.children[3]
    png = image.value
    seq.value = 1024
    assert "seq 1024" in table.value and image.value != png
    batch.value = 64
    model.value = "llama-2-70b"
    assert "llama-2-70b: batch 64, seq 1024" in table.value
    gpu.value = "H200"
    assert "max batch on H200" in table.value
    assert view._repr_mimebundle_()["text/plain"] == view.text()


@pytest.mark.parametrize("change,err,msg", [
    (dict(model="gpt-5"), ConfigError, "unknown model preset 'gpt-5'"),
    (dict(dtype="fp7"), ConfigError, "unknown dtype 'fp7'"),
    (dict(gpu="TPU"), ConfigError, "unknown GPU 'TPU'"),
    (dict(batch=0), ValueError, "batch and seq must be positive"),
])
def test_bad_input(change, err, msg):
    view = EstimatorView()
    with pytest.raises(err, match=msg):
        view.update(**change)
    assert view.state["model"] == "llama-2-7b"      # the state is unchanged after a refused update


def test_text_shows_the_peak_moment_backend_and_context_warning():
    view = EstimatorView()
    text = view.text()
    # the peak is the end-of-forward moment, not the sum of every row; the parts add up to it
    assert "peak 117.0 GiB at the end of forward = weights 25.1 + optimizer 50.2 + weight copies 12.3 + " \
           "activations 28.4 + logits transient 1.0 GiB" in text
    assert "SDPA flash (no s x s matrix kept)" in text            # an A100 (8.0): flash first
    view.update(gpu="H200")
    assert "SDPA cudnn (no s x s matrix kept)" in view.text()     # Hopper: cuDNN first
    assert "forward only, embedding lookup not counted: attention 42.0%" in text
    view.update(model="gpt2", seq=2048)
    assert "WARNING: seq 2048 > the model's context 1024" in view.text()
