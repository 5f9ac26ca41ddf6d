"""The shared fixtures of tests/conftest.py do what the tests that use them assume."""
import torch

from llmsys_lab.generate import generate


def test_greedy_is_generate_alone_and_memoised(tiny, tiny_prompts, greedy):
    model, _ = tiny
    p = tiny_prompts[1]
    first = greedy(model, p, 6)
    assert first == generate(model, [p], 6).new_tokens[0]                      # generate's defaults (EOS 0)
    assert greedy(model, p, 6, eos_token_id=None) == generate(model, [p], 6, eos_token_id=None).new_tokens[0]
    first.append(-1)                                                            # a caller's copy, not the memo
    assert greedy(model, p, 6) == first[:-1]


def test_the_session_model_is_the_bundled_one(tiny, ktiny, tiny_prompts):
    model, tok = tiny
    assert model.config.name.startswith("llmsys-tiny") and not model.training
    assert ktiny is tiny or next(ktiny[0].parameters()).is_cuda
    assert [len(p) for p in tiny_prompts] == [6, 5, 9, 6, 7, 6, 8]


def test_every_test_runs_on_one_intra_op_thread():
    assert torch.get_num_threads() == 1


def test_cli_runs_main_in_this_process_with_its_exit_status(cli):
    ok = cli("estimate", "llama-2-7b", "--json")
    assert ok.returncode == 0 and ok.stdout.lstrip().startswith("{") and ok.stderr == ""
    bad = cli("estimate", "llama2-7b")                                          # argparse-style error: exit 2
    assert bad.returncode == 2 and "Did you mean 'llama-2-7b'" in bad.stderr
