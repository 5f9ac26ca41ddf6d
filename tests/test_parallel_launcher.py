"""The launcher: results come back, a failing, dying or hanging rank gives a clear error and no orphans."""
import multiprocessing
import time

import pytest

from llmsys_lab.parallel import RankError, RankTimeout, launch
from llmsys_lab.parallel.checks import die_on, hang, raise_on
from llmsys_lab.validate import ConfigError


def _no_children_left():
    return multiprocessing.active_children() == []


def test_function_defined_here_runs_from_its_source():
    # a function local to a test (like one defined in a notebook cell) cannot be pickled by name:
    # the launcher ships its source, and the ranks run it with torch and dist in scope
    def rank_and_sum():
        x = torch.tensor([float(dist.get_rank() + 1)], device=device())  # noqa: F821 - provided by the launcher
        dist.all_reduce(x)  # noqa: F821
        return dist.get_rank(), dist.get_world_size(), x.item()  # noqa: F821

    assert launch(rank_and_sum, 2) == [(0, 2, 3.0), (1, 2, 3.0)]
    assert _no_children_left()


def test_a_rank_that_raises_stops_every_rank():
    with pytest.raises(RankError, match="rank 1 raised ValueError: rank 1 was told to fail"):
        launch(raise_on, 2, args=(1,), timeout=60)
    assert _no_children_left()


def test_a_rank_that_dies_stops_every_rank():
    with pytest.raises(RankError, match="rank 1 died with exit code 3"):
        launch(die_on, 2, args=(1,), timeout=60)
    assert _no_children_left()


def test_a_hanging_rank_times_out():
    t0 = time.monotonic()
    with pytest.raises(RankTimeout, match=r"ranks \[0, 1\] of 2 did not finish within 1 s"):
        launch(hang, 2, timeout=1.0)
    assert time.monotonic() - t0 < 100          # the job never ran its 600 s
    assert _no_children_left()


def test_bad_arguments_fail_before_any_process_starts():
    with pytest.raises(ConfigError, match="world_size must be a positive int"):
        launch(hang, 0)
    with pytest.raises(ConfigError, match="backend must be"):
        launch(hang, 2, backend="mpi")
    no_source = {}
    exec("def made_by_exec(rank):\n    return rank", no_source)            # not importable, no source file
    with pytest.raises(ConfigError, match="its source is not available"):
        launch(no_source["made_by_exec"], 2)
    with pytest.raises(ConfigError, match="launch cannot ship a lambda"):  # a lambda's source is a line fragment
        launch(eval("lambda: 1"), 2)
    with pytest.raises(TypeError, match="needs a function"):
        launch(3, 2)
    assert _no_children_left()


def _compare_all_to_all_paths():
    import torch
    import torch.distributed as dist

    from llmsys_lab.parallel import comm

    r, w = dist.get_rank(), dist.get_world_size()
    t = torch.arange(w * 6, dtype=torch.float32).reshape(w * 2, 3) + 100 * r
    send = [p.contiguous() for p in t.chunk(w, 0)]
    library, pairwise = [torch.empty_like(p) for p in send], [torch.empty_like(p) for p in send]
    dist.all_to_all(library, send)
    comm._pairwise_all_to_all(pairwise, send)
    return all(torch.equal(a, b) for a, b in zip(library, pairwise))


def test_pairwise_all_to_all_equals_the_library_one():
    """Older PyTorch's gloo has no all_to_all (the GPU nodes' 2.11): the point-to-point version the kit
    falls back to must exchange exactly the same pieces."""
    assert launch(_compare_all_to_all_paths, 3) == [True, True, True]
