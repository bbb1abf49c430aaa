"""A short profile of forward times (policy verification, draft-model drafting), cached on disk."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from rlhfspec.engine.drafters import DraftModelDrafter, Drafter
from rlhfspec.models.invariance import machine_key
from rlhfspec.models.kv_cache import KVCache
from rlhfspec.strategy.cost_model import CostModel, Table

BATCHES = (1, 2, 4, 8, 16, 32, 64)
TOKENS_PER_ROW = (1, 3, 5, 9)
# Row lengths the selector's profile measures at every batch size, however slow the machine:
# plain decoding and a short draft. Without them a slow CPU's budget ran out at batch 1 to 8, and
# the selector priced verification at batch 64 from there, as if it still cost little more than
# a plain step (on a 2-core AMD EPYC it costs 2-3x: speculation chosen at every step made the
# default run's rollout 1.5x slower than plain decoding).
ALWAYS = (1, 3)
# Bumped when what the profile measures changes, so that profiles cached before are measured again.
PROFILE_FORMAT = 2


def forward_times(model, batches=BATCHES, qs=TOKENS_PER_ROW, context: int = 128, budget_s: float = 6.0,
                  invariant: bool = True, repeats: int = 1, always: tuple[int, ...] = ()) -> Table:
    """Seconds of one forward (with logits for every new row) of q tokens per row over B rows
    whose caches hold `context` tokens (the median of `repeats` after a warm-up). The cache
    contents do not matter for timing, so no prefill is run. The row lengths in `always` are
    measured at every batch size first, whatever the time; the others follow batch by batch, and
    the grid stops growing once the budget is spent."""
    table: Table = {}
    start = time.perf_counter()
    model.ensure_positions(context + max(qs) + 1)
    cuda = model.device.type == "cuda"
    caches: dict[int, KVCache] = {}
    first = [(b, q) for b in batches for q in qs if q in always]
    for b, q in first + [(b, q) for b in batches for q in qs if q not in always]:
        if q not in always and table and time.perf_counter() - start > budget_s:
            break
        if b not in caches:
            caches[b] = KVCache(model.config, b, context + max(qs) + 1, model.dtype, model.device, invariant=invariant)
        cache, slots = caches[b], list(range(b))

        def run():
            cache.lengths[:b] = [context] * b
            model.logits(cache.forward(model, slots, [[0] * q] * b, last_only=False, advance=False), invariant)

        with torch.inference_mode():
            run()
            times = []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize(model.device)
                t = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize(model.device)
                times.append(time.perf_counter() - t)
            table[(b, q)] = sorted(times)[len(times) // 2]
    return table


def profile_key(policy, drafters: dict[str, Drafter]) -> str:
    """Identity of what the profile measured: architectures, dtypes, device, thread count, and
    the machine's kernel choices (a new verdict format re-measures)."""
    parts = {
        "format": PROFILE_FORMAT, "machine": machine_key(),
        "policy": policy.config.hf, "dtype": str(policy.dtype), "device": str(policy.device), "threads": torch.get_num_threads(),
        "invariant": invariant_for(policy.device),
        "drafts": {k: d.model.config.hf for k, d in sorted(drafters.items()) if isinstance(d, DraftModelDrafter)},
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def invariant_for(device: torch.device | str) -> bool:
    """Which forward the selector's profile and the benchmarks run on this device: the
    batch-invariant one on the CPU (the engine's default there), the fast one on a GPU (no
    batch-invariant attention has passed the start-up check on cuBLAS yet)."""
    return torch.device(device).type == "cpu"


def cost_model(policy, drafters: dict[str, Drafter], cache_dir: Path | None = None) -> CostModel:
    """A CostModel from a profile of this policy and these drafters (about 10 s), cached per
    model, device and thread count under cache_dir/profiles."""
    invariant = invariant_for(policy.device)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "profiles" / f"{profile_key(policy, drafters)}.json"
        if path.is_file():
            return CostModel.load(path)
    drafts: dict[str, Table] = {}
    for name, d in drafters.items():
        if isinstance(d, DraftModelDrafter):
            per_token = forward_times(d.model, qs=(1,), budget_s=2.0, invariant=invariant)
            drafts[name] = {(b, n): t * n for (b, _), t in per_token.items() for n in (1, 8)}
    model = CostModel(forward_times(policy, invariant=invariant, always=ALWAYS), drafts)
    if path is not None:
        model.save(path)
    return model
