"""The Triton softmax: compiled on a GPU, through the interpreter on a CPU."""
import pytest
import torch

from llmsys_lab import triton_mode
from llmsys_lab.kernels.softmax import softmax, softmax_reference

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (16, 128), (3, 1000)])
def test_softmax_matches_torch(device, dtype, shape):
    torch.manual_seed(shape[1])
    x = (torch.randn(shape, device=device) * 5).to(dtype)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(softmax(x), softmax_reference(x), atol=tol, rtol=tol)


def test_softmax_is_safe_for_large_logits(device):
    x = torch.tensor([[1000.0, 1000.0, -1000.0]], device=device)
    torch.testing.assert_close(softmax(x).cpu(), torch.tensor([[0.5, 0.5, 0.0]]))


def test_softmax_of_strided_rows(device):
    x = torch.randn(8, 40, device=device)[:, ::2]
    torch.testing.assert_close(softmax(x), softmax_reference(x))


def test_triton_mode_follows_the_hardware():
    assert triton_mode() == ("compiled" if torch.cuda.is_available() else "interpreter")


@pytest.mark.parametrize("bad,err,msg", [
    (torch.randn(2, 3, 4), ValueError, r"x must be 2-D \(rows, cols\), got shape \(2, 3, 4\)"),
    (torch.ones(2, 3, dtype=torch.int32), TypeError, "float16, bfloat16 or float32, got torch.int32"),
    (torch.randn(2, 0), ValueError, "0 columns"),
    ([[1.0, 2.0]], TypeError, "must be a torch.Tensor, got list"),
])
def test_bad_input(bad, err, msg):
    with pytest.raises(err, match=msg):
        softmax(bad)
