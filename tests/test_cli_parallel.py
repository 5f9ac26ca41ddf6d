"""`python -m llmsys_lab estimate ... --tp/--pp/--dp`: the parallel plan in the table and the JSON.

The command line runs in this process (tests/conftest.py's `cli`: llmsys_lab.__main__.main with the same argv)."""
import json

import pytest


@pytest.fixture
def _estimate(cli):
    return lambda *args: cli("estimate", "llama-2-7b", *args)


def test_parallel_flags_reach_table_and_json(_estimate):
    out = _estimate("--tp", "2", "--pp", "2", "--dp", "2", "--micro-batches", "4", "--batch", "8")
    assert out.returncode == 0, out.stderr
    assert "tp2 pp2 dp2" in out.stdout and "global batch 8 x 4096" in out.stdout
    data = json.loads(_estimate("--tp", "2", "--json").stdout)
    par = data["parallel"]
    assert par["plan"]["tp"] == 2 and par["tp_bytes"] > 0 and par["dp_bytes"] == 0
    # with tp=2 each device holds about half the layer weights (embeddings split too)
    assert 0.45 < par["params_per_device"] / 6.74e9 < 0.55
    assert "parallel" not in json.loads(_estimate("--json").stdout)


def test_cli_batch_is_never_changed_silently_and_precision_reaches_the_table(_estimate):
    out = _estimate("--dp", "2", "--micro-batches", "4")            # --batch 1 cannot split into 2 x 4
    assert out.returncode == 2 and "global batch 1 must split into dp = 2 x 4" in out.stderr
    fp32 = _estimate("--dp", "2", "--batch", "2", "--precision", "fp32")
    mixed = _estimate("--dp", "2", "--batch", "2")
    assert fp32.returncode == mixed.returncode == 0, fp32.stderr + mixed.stderr
    assert "fp32 AdamW" in fp32.stdout and "mixed-zero AdamW" in mixed.stdout
    assert fp32.stdout.splitlines()[-1] != mixed.stdout.splitlines()[-1]
    data = json.loads(_estimate("--dp", "2", "--batch", "2", "--precision", "fp32", "--json").stdout)
    assert data["parallel"]["weights"] == 2 * json.loads(_estimate("--dp", "2", "--batch", "2", "--json").stdout)[
        "parallel"]["weights"]


def test_parallel_plan_that_does_not_divide_is_an_error(_estimate):
    out = _estimate("--tp", "3")
    assert out.returncode == 2 and "error" in out.stderr and "3" in out.stderr
