"""Inference: text from a trained model with a KV cache (`sltrain generate`).

    texts = generate(load_run("outputs/pretrain/default"), ["The state of the union", "We"], max_new_tokens=40)

Prompts are batched left-padded: one prefill of the whole batch, then one token per step for every row, each
step attending over the cached keys and values and computing the last position's logits only
(``LlamaForCausalLM.decode``). Greedy decoding (temperature 0) equals transformers' ``generate`` on the export,
token for token; sampling draws from one generator seeded by ``seed``, so the same seed gives the same text. A
context longer than the model's ``max_seq_len`` keeps its last tokens: a prompt is cropped to leave room for the
new tokens, and when the cache fills up it is rebuilt from the last half of the context.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from .configs import ConfigError
from .core.model import KVCache
from .core.sparse_lowrank import choose_kernels
from .runs import LoadedRun


def _next_tokens(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, vocab) logits -> (batch,) ids: argmax, or a sample of softmax(logits / temperature) over the top_k."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]


def prefill(model, ids: torch.Tensor, cache: KVCache, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run a prompt batch (batch, t) into ``cache``: the logits after its last position. SLTrain layers run the
    kernel ``auto`` picks for the prefill's tokens, then the one it picks for one-token steps."""
    param = next(model.parameters())
    choose_kernels(model, ids.numel(), param.dtype, param.device, inference=True)
    logits = model.decode(ids, cache, mask)
    choose_kernels(model, ids.shape[0], param.dtype, param.device, inference=True)
    return logits


def _prefill(model, rows: Sequence[Sequence[int]], pad_id: int, capacity: int, device, dtype):
    """A fresh cache holding the left-padded ``rows``, and the logits after each row's last token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = True
    cache = KVCache(model.config, len(rows), capacity, device, dtype)
    return cache, prefill(model, ids.to(device), cache, mask.to(device))


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: Optional[int],
                 pad_id: int = 0, temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> List[List[int]]:
    """New token ids after each prompt (each non-empty), stopping a row at ``eos_id``; see the module doc."""
    limit = model.config.max_seq_len
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    param = next(model.parameters())
    device, dtype = param.device, param.dtype if param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(int(seed))
    # a long prompt keeps its last tokens, leaving room for up to half a window of new ones before a rebuild
    contexts = [list(p[-(limit - min(max_new_tokens, limit // 2)):]) for p in prompts]
    cache, logits = _prefill(model, contexts, pad_id, limit, device, dtype)
    new: List[List[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        nxt = _next_tokens(logits, temperature, top_k, gen).tolist()
        for i, t in enumerate(nxt):
            if done[i]:
                continue
            if eos_id is not None and t == eos_id:
                done[i] = True
            else:
                new[i].append(t)
                contexts[i].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        if cache.length == limit:  # full: rebuild from the last half of every context
            cache, logits = _prefill(model, [c[-(limit // 2):] for c in contexts], pad_id, limit, device, dtype)
            continue
        feed = torch.tensor([[c[-1]] for c in contexts], dtype=torch.long, device=device)
        logits = model.decode(feed, cache)
    return new


def generate(run: Union[LoadedRun, str, Path], prompts: Union[str, Sequence[str]], max_new_tokens: int = 50,
             temperature: float = 0.8, top_k: int = 50, seed: int = 0) -> Union[str, List[str]]:
    """Prompt + continuation for each prompt (one string for one prompt), from a run in its trained form.

    An empty prompt starts from the end-of-sequence token (what precedes every document in training)."""
    from .export import open_run

    if max_new_tokens < 0:
        raise ConfigError("--max-new-tokens", f"must be >= 0, got {max_new_tokens}")
    if not temperature >= 0:
        raise ConfigError("--temperature", f"must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ConfigError("--top-k", f"must be >= 0 (0 = all tokens), got {top_k}")
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not isinstance(run, LoadedRun):
        run = open_run(run)
    tok = run.tokenizer
    encoded = [tok.encode(t) for t in texts]
    was_training = run.model.training
    run.model.eval()
    try:
        new = generate_ids(run.model, [ids or [tok.eos_id] for ids in encoded], max_new_tokens, tok.eos_id,
                           tok.pad_id, temperature, top_k, seed)
    finally:
        run.model.train(was_training)
    out = []
    for text, ids, more in zip(texts, encoded, new):
        head, full = tok.decode(ids), tok.decode(ids + more)
        out.append(text + full[len(head):] if full.startswith(head) else full)
    return out[0] if single else out
