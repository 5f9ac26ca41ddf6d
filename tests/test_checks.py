import pytest
import torch

from llmsys_lab.checks import CheckFailed, agree, check_close, compare


def test_pass_prints_a_device_independent_line(capsys):
    x = torch.randn(3, 4)
    check_close(x, x.clone(), "attn")
    assert capsys.readouterr().out == "attn: OK (matches within atol=1e-05, rtol=1e-05)\n"
    assert agree(x, x + 1e-7, 1e-5) == "max |err| < 1e-05: True"


@pytest.mark.parametrize("actual,msg", [
    (torch.zeros(3, 5), r"out has shape \(3, 5\), expected \(3, 4\)"),
    (torch.zeros(3, 4, dtype=torch.float64), "out has dtype torch.float64, expected torch.float32"),
    ([[0.0]], "out should be a torch.Tensor, got list"),
])
def test_failures_say_what_differs(actual, msg):
    with pytest.raises(CheckFailed, match=msg):
        check_close(actual, torch.zeros(3, 4), "out")


def test_value_failure_names_the_first_element():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[1, 2] = 0.5
    actual[2, 3] = 0.25
    assert compare(actual, expected, "h") == (
        "h[(1, 2)] is 0.5, expected 0 (2 of 12 elements differ; max |err| = 0.5, tolerance atol=1e-05, rtol=1e-05)")


def test_nan_is_never_close():
    a = torch.tensor([1.0, float("nan")])
    assert "NaN mismatch" in compare(a, torch.tensor([1.0, 2.0]))
