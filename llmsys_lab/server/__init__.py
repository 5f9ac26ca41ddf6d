"""Online serving: the kit's engine behind an OpenAI-compatible HTTP server.

    python -m llmsys_lab serve                      # the bundled llmsys-tiny model on port 8000
    python -m llmsys_lab serve --model path/to/hf-llama-folder --port 8001
    python -m llmsys_lab serve --random llmsys-tiny # a preset's config with random weights

From Python (a notebook, a test): ``with Server.start() as srv: ...`` runs uvicorn in a thread on a
free port; ``srv.url`` is the base URL for the ``openai`` client (``base_url=srv.url + "/v1"``).

Modules: ``protocol`` (request schemas, the error body), ``engine_loop`` (the engine's thread, the
bounded queue, cancellation), ``metrics`` (Prometheus text), ``app`` (the FastAPI routes).
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

TINY = "llmsys-tiny"


def load_model(model: str = TINY, random_preset: str | None = None, dtype=torch.float32, device="cpu", seed: int = 0):
    """(model, tokenizer, name): the bundled model by default, a local Hugging Face Llama folder
    (config.json, model.safetensors, a tokenizer), or a preset's config with random weights (the
    bundled tokenizer then; the preset's vocabulary must hold it)."""
    from transformers import AutoTokenizer

    from ..model import TINY_MODEL_PATH, LlamaLM

    if random_preset is not None:
        from ..presets import get_preset

        cfg = get_preset(random_preset)
        tok = AutoTokenizer.from_pretrained(TINY_MODEL_PATH)
        if cfg.vocab_size < len(tok):
            raise ValueError(f"--random {random_preset}: its vocabulary ({cfg.vocab_size}) is smaller than the bundled "
                             f"tokenizer's ({len(tok)})")
        torch.manual_seed(seed)
        return LlamaLM(cfg).to(device=device, dtype=dtype).eval(), tok, f"{random_preset}-random"
    path = TINY_MODEL_PATH if model == TINY else Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model}: not the bundled {TINY!r} and not a folder")
    return LlamaLM.from_pretrained(path, dtype, device), AutoTokenizer.from_pretrained(path), \
        (TINY if model == TINY else path.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server (uvicorn in a thread): ``url``, the ``loop`` (engine loop), ``app``."""
    url: str
    loop: object
    app: object
    _uvicorn: object
    _thread: threading.Thread

    @classmethod
    def start(cls, model=None, tokenizer=None, model_name: str = TINY, host: str = "127.0.0.1", port: int | None = None,
              num_blocks: int = 256, block_size: int = 16, max_batch: int = 8, token_budget: int = 512,
              chunked_prefill: bool = False, max_queue: int = 64, chat_template: str | None = None,
              default_max_tokens: int = 256, log_level: str = "warning", eos_token_id="tokenizer",
              **engine_kw) -> "Server":
        """Start serving; `eos_token_id`: the tokenizer's by default, an id, or None (requests then end
        only at max_tokens or a stop: what a load test with fixed output lengths wants)."""
        import uvicorn

        from ..engine import Engine
        from .app import create_app
        from .engine_loop import EngineLoop

        if model is None:
            model, tokenizer, model_name = load_model()
        eos = eos_token_id
        if isinstance(eos, str) and eos == "tokenizer":
            eos = tokenizer.eos_token_id if tokenizer is not None else None
        engine = Engine(model, num_blocks, block_size, max_batch=max_batch, token_budget=token_budget,
                        chunked_prefill=chunked_prefill, eos_token_id=eos, **engine_kw)
        if engine.cuda_graphs:
            engine.capture_graphs()
        loop = EngineLoop(engine, max_queue=max_queue).start()
        app = create_app(loop, tokenizer, model_name, chat_template, default_max_tokens)
        port = port or free_port()
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name="llmsys-uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                loop.stop()
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        return cls(f"http://{host}:{port}", loop, app, server, thread)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(10)
        self.loop.stop()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(p) -> None:
    p.add_argument("--model", default=TINY, help=f"{TINY!r} (the bundled model; default) or a local Hugging Face "
                   "Llama folder")
    p.add_argument("--random", metavar="PRESET", default=None, help="serve a preset's config with random weights "
                   "(e.g. llmsys-tiny; python -m llmsys_lab estimate --list)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--num-blocks", type=int, default=256, help="KV-cache blocks in the pool")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8, help="most requests running at once")
    p.add_argument("--token-budget", type=int, default=512, help="most tokens per iteration")
    p.add_argument("--chunked-prefill", action="store_true")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template (for a model "
                   "whose tokenizer has none)")
    p.add_argument("--no-cuda-graphs", action="store_true")


def main(args) -> int:
    import sys

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda")
                                                            else torch.float32)
    try:
        model, tok, name = load_model(args.model, args.random, dtype, args.device)
        template = Path(args.chat_template).read_text() if args.chat_template else None
        srv = Server.start(model, tok, name, args.host, args.port, args.num_blocks, args.block_size, args.max_batch,
                           args.token_budget, args.chunked_prefill, args.max_queue, template, args.max_tokens,
                           log_level="info", cuda_graphs=False if args.no_cuda_graphs else None)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"serving {name} at {srv.url}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)

    def terminate(*_):          # uvicorn runs in a thread, so SIGTERM is handled here: stop cleanly
        raise KeyboardInterrupt

    import signal

    signal.signal(signal.SIGTERM, terminate)
    try:
        while srv._thread.is_alive():
            srv._thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
    return 0
