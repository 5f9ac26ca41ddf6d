"""Runs inside the sandboxed kernel after the notebook: calls the student's functions on the harness's
inputs and writes what they returned (safetensors) and raised (JSON) into the job folder.

Nothing here decides a grade: whatever a submission does to this module, it can only change the data
it hands back, which the harness outside checks against references it computes itself.
"""
from __future__ import annotations

import json
from pathlib import Path


def run(work: str) -> None:
    import torch
    from IPython import get_ipython
    from safetensors.torch import load_file, save_file

    work = Path(work)
    ns = get_ipython().user_ns
    tensors = load_file(str(work / "probe_in.safetensors"))
    outputs, errors = {}, {}
    for call in json.loads((work / "probe_calls.json").read_text()):
        fn = ns.get(call["fn"])
        args = [tensors[a].clone() if isinstance(a, str) and a in tensors else a for a in call["args"]]
        try:
            if fn is None:
                raise NameError(f"name '{call['fn']}' is not defined")
            out = fn(*args, **call["kwargs"])
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"returned {type(out).__name__}, not a tensor")
            outputs[call["id"]] = out.detach().cpu().contiguous().clone()
        except Exception as err:  # noqa: BLE001  (reported to the harness as data)
            errors[call["id"]] = [type(err).__name__, str(err)[:500]]
    save_file(outputs, str(work / "probe_out.safetensors"))
    (work / "probe_errors.json").write_text(json.dumps(errors))
