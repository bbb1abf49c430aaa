"""Reference computations shared by model tests."""

from __future__ import annotations

import torch

from rlhfspec.models.kv_cache import KVCache


def engine_logits(model, prompts: list[list[int]], continuations: list[list[int]], chunks: list[list[int]] | None = None) -> list[torch.Tensor]:
    """Our logits at every position of prompt+continuation, computed the way the engine does:
    one packed prefill of all prompts, then the continuations fed through the KV cache in
    per-sample chunks (default one token per step; chunks[b] gives sample b's chunk sizes)."""
    b = len(prompts)
    total = [len(p) + len(c) for p, c in zip(prompts, continuations)]
    room = max(total) + 16  # finished samples keep feeding a filler token while others run
    model.ensure_positions(room)
    cache = KVCache(model.config, b, room, model.dtype, model.device)
    out: list[list[torch.Tensor]] = [[] for _ in range(b)]
    feeds = [list(p) for p in prompts]
    cursor = [0] * b
    step = 0
    with torch.inference_mode():
        while any(feeds):
            lens = [len(f) for f in feeds]
            att = cache.attend(list(range(b)), lens)
            flat = torch.tensor([t for f in feeds for t in f], device=model.device)
            logits = model.logits(model(flat, att.positions, att), att.invariant)
            cache.advance(list(range(b)), lens)
            for i, rows in enumerate(logits.split(lens)):
                out[i].append(rows)
            feeds = []
            for i, c in enumerate(continuations):
                size = 1 if chunks is None else chunks[i][step % len(chunks[i])]
                size = min(size, len(c) - cursor[i])
                # A sample with nothing left feeds nothing; the cache API needs >= 1 row, so pad the
                # batch only while somebody still has tokens (rows past the end are ignored).
                feeds.append(c[cursor[i] : cursor[i] + size])
                cursor[i] += size
            step += 1
            if not any(feeds):
                break
            feeds = [f if f else [0] for f in feeds]
    return [torch.cat(rows)[: total[i]] for i, rows in enumerate(out)]


def hf_logits(hf_model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """transformers' logits for each sequence alone (no padding), float32."""
    with torch.inference_mode():
        return [hf_model(torch.tensor([s], device=hf_model.device)).logits[0].float() for s in sequences]
