"""Soak: hundreds of requests through the real server with the `openai` client, in bursts above its
capacity, with random lengths, random sampling settings, streaming or not, and random cancellations.
At the end every KV block is free, every request has exactly one outcome (answered once, refused
with 429, or cancelled by its client), the server's counts agree, and it still answers.

The default size runs in well under a minute on two CPU cores; `-m slow` runs a longer one
(LLMSYS_SOAK_REQUESTS overrides both)."""
import asyncio
import collections
import os
import random
import time

import httpx
import openai
import pytest

from llmsys_lab.generate import generate
from llmsys_lab.server import TINY, Server, load_model

WORDS = ("ROMEO JULIET KING QUEEN my lord the of and to I you a is that in not be it with his this me "
         "your love sweet night death sword crown what shall thou thee art heaven").split()


async def one(client, rng, i, log):
    """One request with random settings; records ('ok', text, finish) | ('429',) | ('cancelled',)."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    kw = dict(model=TINY, prompt=prompt, max_tokens=rng.randint(1, 48))
    mode = rng.random()
    if mode < 0.35:
        pass                                                            # greedy
    elif mode < 0.7:
        kw.update(temperature=rng.choice([0.5, 0.8, 1.0, 1.3]), seed=rng.randint(0, 2**31))
    else:
        kw.update(temperature=1.0, top_p=rng.choice([0.5, 0.9, 1.0]),
                  extra_body={"top_k": rng.choice([0, 1, 5, 50])})               # top_k: an extension
    if rng.random() < 0.15:
        kw["stop"] = [rng.choice(["e", "th", "\n", "."])]
    stream = rng.random() < 0.5
    cancel_after = rng.randint(1, 6) if rng.random() < 0.25 else None
    try:
        if stream:
            finishes, text, chunks = [], [], 0
            s = await client.completions.create(stream=True, **kw)
            async for c in s:
                chunks += 1
                text.append(c.choices[0].text)
                if c.choices[0].finish_reason is not None:
                    finishes.append(c.choices[0].finish_reason)
                if cancel_after is not None and chunks >= cancel_after and not finishes:
                    await s.close()                                      # the client goes away mid-stream
                    log[i] = ("cancelled",)
                    return
            assert len(finishes) == 1, finishes                         # exactly one end per stream
            log[i] = ("ok", "".join(text), finishes[0], kw)
        else:
            call = client.completions.create(**kw)
            if cancel_after is not None:
                try:
                    r = await asyncio.wait_for(call, timeout=0.01 * cancel_after)
                except asyncio.TimeoutError:
                    log[i] = ("cancelled",)
                    return
            else:
                r = await call
            assert len(r.choices) == 1
            log[i] = ("ok", r.choices[0].text, r.choices[0].finish_reason, kw)
    except openai.RateLimitError as e:
        assert e.body["code"] == "queue_full" and "at capacity" in e.body["message"]
        log[i] = ("429",)


async def soak(url, n, seed):
    rng = random.Random(seed)
    log = {}
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120) as client:
        i = 0
        while i < n:
            burst = min(n - i, rng.choice([4, 10, 40]))                 # 40 > capacity (8 + 16): some 429s
            await asyncio.gather(*(one(client, random.Random(rng.random()), j, log) for j in range(i, i + burst)))
            i += burst
            await asyncio.sleep(rng.choice([0, 0, 0.05]))
    return log


@pytest.fixture(scope="module")
def tiny():
    return load_model()


def run_soak(tiny, n, seed=0):
    model, tok, name = tiny
    # a small pool (48 blocks of 8 tokens for a batch of 8): preemptions happen too
    with Server.start(model, tok, name, num_blocks=48, block_size=8, max_batch=8, max_queue=16) as srv:
        began = time.perf_counter()
        log = asyncio.run(soak(srv.url, n, seed))
        seconds = time.perf_counter() - began
        eng, stats = srv.loop.engine, dict(srv.loop.stats)
        deadline = time.monotonic() + 10
        while (srv.loop.live or eng.blocks.num_free != eng.blocks.num_blocks) and time.monotonic() < deadline:
            time.sleep(0.02)
        free, total, live = eng.blocks.num_free, eng.blocks.num_blocks, srv.loop.live
        stats = dict(srv.loop.stats)
        health = httpx.get(srv.url + "/health").status_code
        after = httpx.post(srv.url + "/v1/completions", json={"model": TINY, "prompt": "ROMEO.\n", "max_tokens": 5})
    counts = collections.Counter(v[0] for v in log.values())
    print(f"\nsoak: {n} requests in {seconds:.1f} s: {dict(counts)}; server: {stats}; "
          f"blocks free {free}/{total}")
    assert len(log) == n, "a request has no outcome"                    # none lost
    assert live == 0 and free == total, (live, free, total)
    assert health == 200 and after.status_code == 200
    assert stats["failed"] == 0
    assert sum(counts.values()) == n
    # the server saw every answered and every refused request; a client may cancel before its request
    # arrived or before it read the 429, so only those bounds are exact
    assert counts["ok"] + counts["429"] <= stats["submitted"] + stats["refused"] <= n
    assert counts["429"] <= stats["refused"] <= counts["429"] + counts["cancelled"]
    assert stats["submitted"] == stats["finished"] + stats["aborted"]   # every admitted one ended, once
    stopped_by_string = sum(1 for v in log.values() if v[0] == "ok" and v[3].get("stop"))
    assert counts["ok"] - stopped_by_string <= stats["finished"] <= counts["ok"] + counts["cancelled"]
    assert counts["ok"] > n // 2 and counts["cancelled"] > 0 and counts["429"] > 0
    # greedy answers are generate's, whatever else shared their batches
    greedy = [v for v in log.values() if v[0] == "ok" and "temperature" not in v[3] and "stop" not in v[3]]
    for _, text, _, kw in greedy[:5]:
        ids = tok(kw["prompt"]).input_ids
        ref = generate(model, [ids], kw["max_tokens"], eos_token_id=tok.eos_token_id).new_tokens[0]
        assert text == tok.decode(ref, skip_special_tokens=True)
    return counts, stats


def test_soak(tiny):
    run_soak(tiny, int(os.environ.get("LLMSYS_SOAK_REQUESTS", 300)))


@pytest.mark.slow
def test_soak_long(tiny):
    run_soak(tiny, int(os.environ.get("LLMSYS_SOAK_REQUESTS", 3000)), seed=1)
