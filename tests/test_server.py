"""The OpenAI-compatible server, driven over HTTP on localhost by the official `openai` client (and raw
HTTP for malformed requests): greedy equals generate, streaming and not, chat, bad requests, a client
killed mid-stream, backpressure, metrics."""
import json
import socket
import time

import httpx
import openai
import pytest
import torch

from llmsys_lab.generate import generate
from llmsys_lab.server import TINY, Server, load_model

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}.\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT.\n{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    return load_model()


@pytest.fixture(scope="module")
def server(tiny):
    model, tok, name = tiny
    with Server.start(model, tok, name, num_blocks=64, block_size=16, max_batch=4, max_queue=8,
                      chat_template=CHAT_TEMPLATE) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def wait_all_free(server, timeout=10.0):
    """Every KV block free and no live request, within `timeout` seconds."""
    eng = server.loop.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if eng.blocks.num_free == eng.blocks.num_blocks and server.loop.live == 0 and not eng.scheduler.has_work:
            return True
        time.sleep(0.02)
    return False


PROMPTS = ["ROMEO.\n", "To be, or not", "KING.\nMy lords, I pray you"]


def reference_text(tiny, prompt, n):
    model, tok, _ = tiny
    ids = tok(prompt).input_ids
    out = generate(model, [ids], n, eos_token_id=tok.eos_token_id).new_tokens[0]
    return tok.decode(out, skip_special_tokens=True), out


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [TINY]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_generate(tiny, client, prompt):
    text, ids = reference_text(tiny, prompt, 24)
    r = client.completions.create(model=TINY, prompt=prompt, max_tokens=24)
    assert r.choices[0].text == text
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.prompt_tokens == len(tiny[1](prompt).input_ids)
    assert r.choices[0].finish_reason == ("stop" if ids[-1] == tiny[1].eos_token_id else "length")


def test_streaming_completion_equals_generate(tiny, client):
    text, _ = reference_text(tiny, PROMPTS[2], 30)
    pieces, reasons = [], []
    for chunk in client.completions.create(model=TINY, prompt=PROMPTS[2], max_tokens=30, stream=True):
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 3                         # it streamed, not one piece
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])


def test_concurrent_greedy_requests_equal_generate(tiny, server):
    """Requests that share batches: each answer is still generate's."""
    import concurrent.futures as cf

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    refs = [reference_text(tiny, p, 20)[0] for p in PROMPTS]
    with cf.ThreadPoolExecutor(6) as ex:
        futs = [ex.submit(c.completions.create, model=TINY, prompt=p, max_tokens=20) for p in PROMPTS * 2]
        got = [f.result().choices[0].text for f in futs]
    assert got == refs * 2


def test_seeded_sampling_is_reproducible_over_http(client):
    kw = dict(model=TINY, prompt=PROMPTS[0], max_tokens=20, temperature=0.9, top_p=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    c = client.completions.create(**{**kw, "seed": 8}).choices[0].text
    assert a == b and a != c


def test_stop_strings(tiny, client):
    text, _ = reference_text(tiny, PROMPTS[1], 40)
    stop = text[8:11]
    r = client.completions.create(model=TINY, prompt=PROMPTS[1], max_tokens=40, stop=[stop])
    assert r.choices[0].text == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=TINY, prompt=PROMPTS[1], max_tokens=40, stop=stop, stream=True))
    assert streamed == text[:text.index(stop)]


def test_chat_uses_the_template_and_streams(tiny, client):
    model, tok, _ = tiny
    messages = [{"role": "user", "content": "Speak, Romeo."}]
    ids = tok.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    out = generate(model, [ids], 16, eos_token_id=tok.eos_token_id).new_tokens[0]
    want = tok.decode(out, skip_special_tokens=True)
    r = client.chat.completions.create(model=TINY, messages=messages, max_tokens=16)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=TINY, messages=messages, max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_chat_without_a_template_is_a_clear_400(tiny):
    model, tok, name = tiny
    with Server.start(model, tok, name, num_blocks=16, max_batch=2) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}])
        assert "has no chat template" in e.value.body["message"] and e.value.body["code"] == "no_chat_template"


# ---- bad requests: a 4xx with an OpenAI-style body, never a traceback ------------------------------
def _post(server, path, body, raw=False):
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("body,status,param,words", [
    ("{not json", 400, None, "not valid JSON"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model", "does not exist"),
    ({"model": TINY, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens must be an int >= 1"),
    ({"model": TINY, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens", ">= 1"),
    ({"model": TINY, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens", "more than the model's context"),
    ({"model": TINY, "prompt": "hi " * 600, "max_tokens": 1}, 400, "prompt", "the model's context is 512"),
    ({"model": TINY, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "max_tokens"),
    ({"model": TINY, "prompt": 5}, 400, "prompt", "prompt"),
    ({"model": TINY, "prompt": "hi", "temperature": -1}, 400, "temperature", "temperature must be >= 0"),
    ({"model": TINY, "prompt": "hi", "top_p": 0}, 400, "top_p", "top_p must be in (0, 1]"),
    ({"model": TINY, "prompt": "hi", "top_k": True}, 400, "top_k", "top_k"),
    ({"model": TINY, "prompt": "hi", "n": 2}, 400, "n", "not supported"),
    ({"model": TINY, "prompt": "hi", "stream": "yes"}, 400, "stream", "stream"),
    ({"model": TINY, "prompt": [1, 2, 99999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": TINY, "prompt": []}, 400, "prompt", "empty"),
    ({"prompt": "hi"}, 400, "model", "model"),
])
def test_bad_completion_requests(server, body, status, param, words):
    r = _post(server, "/v1/completions", body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err
    assert "Traceback" not in r.text


def test_bad_chat_requests_and_unknown_routes(server, client):
    r = _post(server, "/v1/chat/completions", {"model": TINY, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = _post(server, "/v1/chat/completions", {"model": TINY, "messages": []})
    assert r.status_code == 400 and "messages is empty" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert wait_all_free(server)


# ---- cancellation, backpressure, metrics -----------------------------------------------------------
@pytest.fixture(scope="module")
def endless(tiny):
    """A server whose requests end only at max_tokens (no EOS): a killed client is sure to be mid-request."""
    model, tok, name = tiny
    with Server.start(model, tok, name, num_blocks=64, block_size=16, max_batch=4, eos_token_id=None) as srv:
        yield srv


def _raw_request(server, body: dict):
    host, port = server.url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_killed_mid_request_frees_its_blocks(endless, stream):
    """Open a request on a raw socket (streaming: read a few events; not: wait until it runs), close the
    socket: the request is aborted and every KV block is free again, and the server still answers."""
    server = endless
    eng = server.loop.engine
    aborted, finished = server.loop.stats["aborted"], server.loop.stats["finished"]
    for i in range(3):
        s = _raw_request(server, {"model": TINY, "prompt": PROMPTS[i], "max_tokens": 450, "stream": stream,
                                  "temperature": 1.0})
        if stream:
            got = b""
            while got.count(b"data:") < 3:
                got += s.recv(4096)
        else:
            deadline = time.monotonic() + 30
            while not eng.scheduler.running or any(not r.output for r in eng.scheduler.running):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert eng.blocks.num_free < eng.blocks.num_blocks          # it holds blocks while it runs
        s.close()
    assert wait_all_free(server), (eng.blocks.num_free, eng.blocks.num_blocks, server.loop.live)
    assert server.loop.stats["aborted"] == aborted + 3 and server.loop.stats["finished"] == finished
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    assert c.completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=3).usage.completion_tokens == 3


def test_a_full_queue_answers_429_with_the_reason(tiny):
    model, tok, name = tiny
    import concurrent.futures as cf

    with Server.start(model, tok, name, num_blocks=64, max_batch=1, max_queue=1) as srv:
        body = {"model": TINY, "prompt": "ROMEO.\n", "max_tokens": 60, "temperature": 1.0, "seed": 1,
                "stop_token_ids": []}
        with cf.ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda _: httpx.post(srv.url + "/v1/completions", json=body, timeout=120), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 429 in codes, codes
        refused = next(r for r in rs if r.status_code == 429)
        err = refused.json()["error"]
        assert err["code"] == "queue_full" and "at capacity" in err["message"] and err["type"] == "rate_limit_error"
        assert refused.headers["retry-after"] == "1"
        assert wait_all_free(srv)


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=8)
    text = httpx.get(server.url + "/metrics").text
    for name in ("llmsys_num_requests_running", "llmsys_num_requests_waiting", "llmsys_kv_blocks_used",
                 "llmsys_time_to_first_token_seconds_bucket", "llmsys_time_per_output_token_seconds_count"):
        assert f"\n{name}" in "\n" + text, name
    count = next(line for line in text.splitlines() if line.startswith("llmsys_time_to_first_token_seconds_count"))
    assert int(count.split()[-1]) >= 1
    inf = next(line for line in text.splitlines()
               if line.startswith('llmsys_time_to_first_token_seconds_bucket{le="+Inf"}'))
    assert inf.split()[-1] == count.split()[-1]


def test_serve_command_line_refuses_a_missing_folder(capsys):
    from llmsys_lab.__main__ import main

    assert main(["serve", "--model", "/no/such/folder"]) == 2
    assert "not the bundled" in capsys.readouterr().err


def test_serve_command_line_serves(tiny):
    """`python -m llmsys_lab serve` in its own process: it answers, greedy equals generate, and it stops."""
    import subprocess
    import sys

    from llmsys_lab.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llmsys_lab", "serve", "--port", str(port), "--max-batch", "2",
                             "--num-blocks", "32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = c.completions.create(model=TINY, prompt=PROMPTS[0], max_tokens=12)
        assert r.choices[0].text == reference_text(tiny, PROMPTS[0], 12)[0]
    finally:
        proc.terminate()
        proc.wait(20)
    assert proc.returncode == 0


def test_load_model_random_weights_and_a_local_folder():
    from llmsys_lab.model import TINY_MODEL_PATH

    model, tok, name = load_model(random_preset="llmsys-tiny")
    bundled, _, folder_name = load_model(str(TINY_MODEL_PATH))
    assert name == "llmsys-tiny-random" and folder_name == "llmsys-tiny"
    assert model.config.vocab_size == bundled.config.vocab_size
    assert not torch.equal(model.lm_head.weight, bundled.lm_head.weight)
    with pytest.raises(ValueError, match="unknown model preset 'no-such-preset'"):
        load_model(random_preset="no-such-preset")
