"""An OpenAI-compatible HTTP server around the kit's engine (FastAPI + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming with server-sent
events, or one JSON answer), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).

Every request is checked before it reaches the engine (model name, types, sampling values, prompt
and max_tokens against the context and the KV pool); a bad one gets a 4xx with an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``; a full queue a 429 with the reason; a stopped
engine a 503. A client that disconnects has its request aborted: its blocks are free before the
engine's next iteration.

Text: the tokenizer decodes the generated tokens incrementally (a character split across tokens is
held back until complete); stop strings end a request at their first occurrence, which is not part
of the text, and text that might be the start of a stop string is held back until it is not.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_loop import EngineLoop, NotRunning, Overloaded, Stream
from .metrics import ServerMetrics
from .protocol import APIError, ChatRequest, CompletionRequest, new_id, now, usage


class Detokenizer:
    """Generated tokens -> text, with stop strings (see the module docstring)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt: list[int]):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0                       # characters of the text already handed out
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def add(self, ids: list[int], final: bool = False) -> str:
        """Add tokens; return the new text that can be sent now (all of it when `final`)."""
        if self.stopped:
            return ""
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            i = text.find(s, max(0, self.sent - len(s)))
            if i >= 0:
                text, self.stopped, final = text[:i], True, True
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):               # an incomplete character: wait for its next byte(s)
                end -= 1
            end = max(self.sent, end - self.hold)
        out = text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


def create_app(loop: EngineLoop, tokenizer, model_name: str, chat_template: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    app = FastAPI(title="llmsys-lab server", version="0.1.0")
    app.state.loop, app.state.metrics = loop, ServerMetrics()
    metrics = app.state.metrics
    engine = loop.engine
    context = engine.cfg.max_position_embeddings
    pool_tokens = engine.blocks.num_blocks * engine.blocks.block_size
    template = chat_template or getattr(tokenizer, "chat_template", None)
    created = now()

    # ---- errors: every one OpenAI-shaped ------------------------------------------------------
    def error_response(e: APIError, endpoint: str) -> JSONResponse:
        metrics.response(endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param, code = f"the body is not valid JSON: {first.get('msg')}", None, "invalid_json"
        else:
            param = loc[0] if loc else None
            where = ".".join(loc) or "body"
            msg = f"{where}: {first.get('msg', 'invalid')} (got {first.get('input')!r})"
            code = "invalid_type" if "type" in str(first.get("type")) else "invalid_value"
        return error_response(APIError(400, msg, param=param, code=code), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       type=kind, code=str(e.status_code)), request.url.path)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error",
                                       code="internal_error"), request.url.path)

    # ---- plain endpoints ----------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not loop.running:
            raise APIError(503, f"the engine loop is not running ({loop.error or 'stopped'})", type="server_error",
                           code="engine_stopped")
        return {"status": "ok", "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                "live": loop.live, "kv_blocks_free": engine.blocks.num_free}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llmsys-lab", "max_model_len": context}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(loop), media_type="text/plain; version=0.0.4")

    # ---- checks shared by both generation endpoints -------------------------------------------
    def admit(body, prompt: list[int]):
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist: this server serves {model_name!r} "
                                "(GET /v1/models)", type="not_found_error", param="model", code="model_not_found")
        params = body.sampling(min(default_max_tokens, max(1, context - len(prompt))))
        if not prompt:
            raise APIError(400, "the prompt is empty: it needs at least one token", param="prompt",
                           code="invalid_value")
        vocab = engine.cfg.vocab_size
        for i, t in enumerate(prompt):
            if not 0 <= t < vocab:
                raise APIError(400, f"prompt token {i} = {t} is outside the vocabulary 0 .. {vocab - 1}",
                               param="prompt", code="invalid_value")
        for i, t in enumerate(params.stop_token_ids):
            if t >= vocab:
                raise APIError(400, f"stop_token_ids[{i}] = {t} is outside the vocabulary 0 .. {vocab - 1}",
                               param="stop_token_ids", code="invalid_value")
        if len(prompt) >= context:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the model's context is {context}, so no token "
                                "can follow it", param="prompt", code="context_length_exceeded")
        if len(prompt) + params.max_tokens > context:
            raise APIError(400, f"max_tokens = {params.max_tokens} with a {len(prompt)}-token prompt needs "
                                f"{len(prompt) + params.max_tokens} positions, more than the model's context of "
                                f"{context} (at most {context - len(prompt)})", param="max_tokens",
                           code="context_length_exceeded")
        if len(prompt) + params.max_tokens > pool_tokens:
            raise APIError(400, f"the request needs up to {len(prompt) + params.max_tokens} tokens of KV cache, more "
                                f"than the server's whole pool of {pool_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        if not engine.scheduler.chunked_prefill and len(prompt) > engine.scheduler.token_budget:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the per-iteration token budget of "
                                f"{engine.scheduler.token_budget} (start the server with --chunked-prefill)",
                           param="prompt", code="context_length_exceeded")
        try:
            return loop.submit(prompt, params)
        except Overloaded as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NotRunning as e:
            raise APIError(503, str(e), type="server_error", code="engine_stopped") from None

    async def events(stream: Stream, http: Request | None):
        """Items of `stream` until it ends. Non-streaming (`http` given): every quarter second, whether
        tokens flow or not, checks that the client is still there, and aborts the request if not."""
        checked = time.monotonic()
        while True:
            if http is None:
                item = await stream.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(stream.queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    item = None
                if time.monotonic() - checked >= 0.25 or item is None:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        loop.abort(stream)
                        return
                if item is None:
                    continue
            yield item
            if item[0] != "tokens":
                return

    async def collect(stream: Stream, detok: Detokenizer, http: Request):
        """Run a request to its end; returns (text, finish_reason, tokens, token_times)."""
        text, reason, times = "", None, []
        async for kind, val in events(stream, http):
            if kind == "tokens":
                times += [time.perf_counter()] * len(val)
                text += detok.add(val)
                if detok.stopped:
                    loop.abort(stream)
                    reason = "stop"
                    break
            elif kind == "done":
                reason = reason or val
                text += detok.add([], final=True)
            else:
                raise APIError(500, val, type="server_error", code="engine_error")
        if reason is None:                          # the client went away
            return None
        return text, reason, times

    def count_tokens(detok: Detokenizer) -> int:
        return len(detok.ids)

    # ---- /v1/completions ----------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer(body.prompt).input_ids
        stream = admit(body, prompt)
        detok = Detokenizer(tokenizer, stream.sampling.stop, prompt)
        rid = new_id("cmpl")
        prefix = (body.prompt if isinstance(body.prompt, str) else tokenizer.decode(prompt)) if body.echo else ""
        if body.stream:
            return sse(stream, detok, http, lambda text, reason: {
                "id": rid, "object": "text_completion", "created": now(), "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]},
                prefix, "/v1/completions")
        got = await collect(stream, detok, http)
        if got is None:
            return JSONResponse({}, status_code=499)
        text, reason, times = got
        metrics.request_done(stream.received, times, len(prompt))
        metrics.response("/v1/completions", 200)
        return {"id": rid, "object": "text_completion", "created": now(), "model": model_name,
                "choices": [{"index": 0, "text": prefix + text, "logprobs": None, "finish_reason": reason}],
                "usage": usage(len(prompt), count_tokens(detok))}

    # ---- /v1/chat/completions -----------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        if not template:
            raise APIError(400, f"the model {model_name!r} has no chat template (its tokenizer defines none): use "
                                "/v1/completions, or start the server with --chat-template FILE",
                           param="messages", code="no_chat_template")
        if not body.messages:
            raise APIError(400, "messages is empty: a chat needs at least one message", param="messages",
                           code="invalid_value")
        try:
            prompt = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], chat_template=template,
                                                   add_generation_prompt=True, tokenize=True)
            if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
                prompt = prompt["input_ids"]
        except Exception as e:      # a template that raises on these messages (e.g. roles it refuses)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages",
                           code="invalid_value") from None
        stream = admit(body, list(prompt))
        detok = Detokenizer(tokenizer, stream.sampling.stop, prompt)
        rid = new_id("chatcmpl")
        if body.stream:
            first = [True]

            def chunk(text, reason):
                delta = {"content": text} if text or reason is None else {}
                if first[0]:
                    delta, first[0] = {"role": "assistant", **delta}, False
                return {"id": rid, "object": "chat.completion.chunk", "created": now(), "model": model_name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}
            return sse(stream, detok, http, chunk, "", "/v1/chat/completions")
        got = await collect(stream, detok, http)
        if got is None:
            return JSONResponse({}, status_code=499)
        text, reason, times = got
        metrics.request_done(stream.received, times, len(prompt))
        metrics.response("/v1/chat/completions", 200)
        return {"id": rid, "object": "chat.completion", "created": now(), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}],
                "usage": usage(len(prompt), count_tokens(detok))}

    # ---- server-sent events -------------------------------------------------------------------
    def sse(stream: Stream, detok: Detokenizer, http: Request, make, prefix: str, endpoint: str):
        async def gen():
            times, done = [], False
            try:
                if prefix:
                    yield f"data: {json.dumps(make(prefix, None))}\n\n"
                async for kind, val in events(stream, None):
                    if kind == "tokens":
                        times += [time.perf_counter()] * len(val)
                        text = detok.add(val)
                        if detok.stopped:
                            loop.abort(stream)
                            if text:
                                yield f"data: {json.dumps(make(text, None))}\n\n"
                            yield f"data: {json.dumps(make('', 'stop'))}\n\n"
                            done = True
                            break
                        if text:
                            yield f"data: {json.dumps(make(text, None))}\n\n"
                    elif kind == "done":
                        text = detok.add([], final=True)
                        if text:
                            yield f"data: {json.dumps(make(text, None))}\n\n"
                        yield f"data: {json.dumps(make('', val))}\n\n"
                        done = True
                    else:
                        err = APIError(500, val, type="server_error", code="engine_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        done = True
                if done:
                    metrics.request_done(stream.received, times, len(stream.prompt))
                    metrics.response(endpoint, 200)
                yield "data: [DONE]\n\n"
            finally:
                if not done:                    # the client went away mid-stream (the generator is closed)
                    loop.abort(stream)
        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
