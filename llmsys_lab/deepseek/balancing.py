"""Load balancing at DeepSeek's scale: the auxiliary loss vs DeepSeek-V3's bias, and node-limited routing.

Auxiliary-loss-free balancing (DeepSeek-V3 report, section 2.1.2): each expert i has a bias b_i that is
added to its affinity *only to choose* the top-k experts; the gating weight stays the unbiased
affinity. After each training step, b_i is decreased by gamma if expert i was overloaded and increased
by gamma if underloaded (``llmsys_lab.moe.update_selection_bias``). No gradient pushes the router
toward balance, so the language-modelling loss is not traded for it (the report's argument; it keeps a
tiny sequence-wise auxiliary loss, alpha = 0.0001, as well).

``train_balancing`` trains the kit's tiny MoE (``moe_llama``, llmsys-tiny-moe's shape) from scratch
three ways on the same tokens and measures the load imbalance (max / mean expert load) and the loss.

Node-limited routing (section 2.1.2): with the experts spread over nodes, each token goes to at most
M nodes, chosen by the sum of the highest k/M affinities on each node (``MoEConfig.num_groups``,
``topk_groups``). ``dispatch_bytes`` counts what one token's hidden state costs to send under it,
with lesson 09's accounting (one h-vector copy per destination, bf16).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..parallel.expert_parallel import ep_bytes
from ..moe import MoE, load_balancing_loss, moe_llama, update_selection_bias
from ..validate import ConfigError

STRATEGIES = ("none", "aux_loss", "bias")


def imbalance(experts: torch.Tensor, num_experts: int) -> float:
    """max / mean load over the experts, from (N, k) chosen expert ids (1.0: perfectly balanced)."""
    load = torch.bincount(experts.reshape(-1), minlength=num_experts).float()
    return float(load.max() / load.mean())


def train_balancing(batches: torch.Tensor, strategy: str, steps: int, *, aux_coef: float = 0.01,
                    bias_rate: float = 0.001, lr: float = 3e-3, seed: int = 0, eval_batch: torch.Tensor | None = None,
                    start: str = "scratch"):
    """Train the tiny MoE (llmsys-tiny-moe's shape) from scratch on `batches` (n, B, T) token ids, cycling.

    strategy: "none" (cross-entropy only), "aux_loss" (+ aux_coef x the Switch/Mixtral loss, averaged over
    layers) or "bias" (cross-entropy only; DeepSeek-V3's selection bias updated by bias_rate each step).
    start: "scratch" (transformers' N(0, 0.02) init) or "checkpoint" (the bundled llmsys-tiny-moe, trained
    with the auxiliary loss; its bias starts at zero).
    Returns per-step losses and imbalance (mean over layers of max/mean load) and the final evaluation."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"steps must be a positive int, got {steps!r}")
    if batches.dim() != 3:
        raise ConfigError(f"batches must be (n, batch, seq) token ids, got shape {tuple(batches.shape)}")
    base, moe_cfg = tiny_moe_shape(selection_bias=strategy == "bias")
    if int(batches.max()) >= base.vocab_size or int(batches.min()) < 0:
        raise ConfigError(f"token ids must be in [0, {base.vocab_size}), got {int(batches.min())}..{int(batches.max())}")
    torch.manual_seed(seed)
    model = tiny_moe_model(strategy == "bias", start)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    log = {"loss": [], "imbalance": [], "strategy": strategy}
    began = time.perf_counter()
    for step in range(steps):
        x = batches[step % batches.shape[0]]
        logits = model(x)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss = ce
        if strategy == "aux_loss":
            loss = ce + aux_coef * sum(load_balancing_loss(m.last_routing.logits, moe_cfg.top_k) for m in layers) / len(layers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if strategy == "bias":
            for m in layers:
                update_selection_bias(m.e_score_correction_bias, m.last_routing.experts, bias_rate)
        log["loss"].append(ce.item())
        log["imbalance"].append(sum(imbalance(m.last_routing.experts, moe_cfg.num_experts) for m in layers) / len(layers))
    log["seconds"] = time.perf_counter() - began
    if eval_batch is not None:
        model.eval()
        with torch.no_grad():
            logits = model(eval_batch)
        log["eval_loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), eval_batch[:, 1:].reshape(-1)).item()
        log["eval_imbalance"] = [imbalance(m.last_routing.experts, moe_cfg.num_experts) for m in layers]
    log["model"] = model
    return log


def tiny_moe_model(selection_bias: bool, start: str = "checkpoint"):
    """The kit's ``moe_llama`` of llmsys-tiny-moe's shape, from the bundled checkpoint or from scratch
    (transformers' N(0, 0.02) init); with ``selection_bias`` each MoE layer gets a zero bias buffer."""
    if start not in ("scratch", "checkpoint"):
        raise ConfigError(f"start must be 'scratch' or 'checkpoint', got {start!r}")
    base, moe_cfg = tiny_moe_shape(selection_bias)
    model = moe_llama(base, moe_cfg)
    if start == "checkpoint":
        from ..moe import load_tiny_moe
        missing = model.load_state_dict(load_tiny_moe()[0].state_dict(), strict=False).missing_keys
        if any("e_score_correction_bias" not in k for k in missing):
            raise ConfigError(f"the checkpoint does not fill {missing}")
    else:
        with torch.no_grad():                                  # transformers' init, as the training script
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
    return model


@torch.no_grad()
def calibrate_bias(model, batches: torch.Tensor, rate: float, rounds: int) -> list[float]:
    """Only the bias moves: `rounds` forward passes over `batches` (n, B, T), each followed by
    ``update_selection_bias`` in every MoE layer. Returns the mean imbalance over layers, per round."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers or not all(m.config.selection_bias for m in layers):
        raise ConfigError("calibrate_bias needs a model whose MoE layers have selection_bias=True")
    out = []
    for r in range(rounds):
        model(batches[r % batches.shape[0]])
        out.append(sum(imbalance(m.last_routing.experts, m.config.num_experts) for m in layers) / len(layers))
        for m in layers:
            update_selection_bias(m.e_score_correction_bias, m.last_routing.experts, rate)
    return out


def sample_corpus(n: int, batch: int, seq: int, seed: int = 0, temperature: float = 1.0) -> torch.Tensor:
    """(n, batch, seq) token ids sampled from the bundled llmsys-tiny (the kit has no corpus text in the
    package): Shakespeare-like text from the distribution the dense model learnt, with a fixed seed."""
    from ..model import load_tiny

    for name, v in (("n", n), ("batch", batch), ("seq", seq)):
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{name} must be a positive int, got {v!r}")
    model, tok = load_tiny()
    g = torch.Generator().manual_seed(seed)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = torch.full((n * batch, 1), eos, dtype=torch.long)
    with torch.no_grad():
        from ..kv_cache import KVCache
        cache = KVCache.for_model(model.config, n * batch, seq)
        logits = model(ids, kv_cache=cache)
        for _ in range(seq - 1):
            probs = torch.softmax(logits[:, -1].float() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
            ids = torch.cat([ids, nxt], dim=1)
            logits = model(nxt, kv_cache=cache)
    return ids.view(n, batch, seq)


def dispatch_bytes(num_experts: int, top_k: int, nodes: int, max_nodes: int | None, hidden: int = 7168,
                   bytes_per_el: int = 1, tokens: int = 10000, seed: int = 0, score_skew: float = 0.0) -> dict:
    """Inter-node dispatch bytes per token when the experts are spread evenly over `nodes` nodes:
    measured on `tokens` random tokens routed by ``route`` with ``topk_groups = max_nodes`` (None: no
    limit), one h-vector copy per *distinct node* a token reaches other than its own (IB traffic;
    inside a node NVLink forwards it to the GPUs: the report's two-hop dispatch). Lesson 09's
    accounting counts one copy per (token, expert) instead: the report's scheme deduplicates by node.
    bytes_per_el: 1 for DeepSeek-V3's FP8 dispatch (the combine is bf16)."""
    from ..moe import route

    if num_experts % nodes:
        raise ConfigError(f"num_experts = {num_experts} is not divisible by nodes = {nodes}")
    g = torch.Generator().manual_seed(seed)
    logits_w = torch.randn(num_experts, 16, generator=g)
    x = torch.randn(tokens, 16, generator=g) * (1 + score_skew)
    groups = nodes if max_nodes is not None else 1
    r = route(x, logits_w, top_k, score="sigmoid", num_groups=groups, topk_groups=max_nodes or 1)
    node = r.experts // (num_experts // nodes)                                   # (N, k)
    reached = F.one_hot(node, nodes).amax(dim=1)                                 # (N, nodes) 0/1
    home = torch.randint(0, nodes, (tokens,), generator=g)                       # the node the token lives on
    remote = reached.sum(1) - reached.gather(1, home[:, None])[:, 0]
    per_copy = hidden * bytes_per_el
    return {"nodes_per_token": reached.sum(1).float().mean().item(),
            "max_nodes_per_token": int(reached.sum(1).max()),
            "remote_nodes_per_token": remote.float().mean().item(),
            "bytes_per_token_dedup": remote.float().mean().item() * per_copy,
            # lesson 09: the (E, C, h) dispatch all-to-all of a balanced layer, per token (forward dispatch only)
            "bytes_per_token_per_expert": ep_bytes(num_experts, math.ceil(tokens * top_k / num_experts), hidden,
                                                   nodes, bytes_per_el, backward=False) / 2 / tokens}


def tiny_moe_shape(selection_bias: bool = False):
    """llmsys-tiny-moe's shape (scripts/train_tiny_moe.py): 4 layers, hidden 128, 8 experts of 128, top-2."""
    from ..configs import ModelConfig
    from ..moe import MoEConfig

    base = ModelConfig(name="llmsys-tiny-moe", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=256, vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=True)
    return base, MoEConfig(128, 128, num_experts=8, top_k=2, selection_bias=selection_bias)
