"""`generate`: complete many prompts with continuous batching on one generation instance."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq

from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.progress import Progress
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import GenerationOutput, Sequence
from rlhfspec.errors import RlhfspecError

DEFAULT_MAX_BATCH = 64


def generate(
    model,
    prompts_token_ids: Seq[Seq[int]],
    params: SamplingParams | None = None,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    tokenizer=None,
    progress: bool = False,
    sample_ids: Seq[int] | None = None,
    groups: Seq[int] | None = None,
) -> list[GenerationOutput]:
    """Complete each prompt (token ids); outputs in prompt order.

    Up to `batch_size` samples run at once (default min(#prompts, 64)); a finished sample's slot
    is refilled from the queue. Sample i's randomness is keyed by (seed, sample_ids[i], position)
    (sample_ids default to 0..n-1), so its tokens do not depend on batch_size or on which other
    prompts run beside it. `groups[i]` marks samples of the same prompt (RL sampling groups).
    """
    params = params or SamplingParams()
    if not prompts_token_ids:
        return []
    ids = list(range(len(prompts_token_ids))) if sample_ids is None else list(sample_ids)
    if len(set(ids)) != len(ids) or len(ids) != len(prompts_token_ids):
        raise RlhfspecError(f"sample_ids must be {len(prompts_token_ids)} distinct integers, one per prompt.")
    seqs = [
        Sequence(sample_id=ids[i], prompt=[int(t) for t in p], params=params, seed=seed, group=None if groups is None else groups[i])
        for i, p in enumerate(prompts_token_ids)
    ]
    longest = max(len(s.prompt) for s in seqs)
    limit = model.config.max_position_embeddings
    if longest + params.max_new_tokens > limit:
        worst = max(seqs, key=lambda s: len(s.prompt))
        raise RlhfspecError(
            f"prompt {worst.sample_id} is {len(worst.prompt)} tokens; with max_new_tokens {params.max_new_tokens} "
            f"it exceeds the model's {limit} positions."
        )
    batch = min(batch_size or DEFAULT_MAX_BATCH, len(seqs))
    instance = GenerationInstance(model, batch, longest + params.max_new_tokens, tokenizer=tokenizer)
    for s in seqs:
        instance.validate(s)
    run(instance, seqs, progress=progress)
    return [GenerationOutput.of(s) for s in seqs]


def run(instance: GenerationInstance, seqs: list[Sequence], progress: bool = False) -> None:
    """Drive an instance until every sample has finished, admitting queued samples into free slots."""
    queue = deque(seqs)
    bar = Progress(total=len(seqs), enabled=progress)
    start = time.perf_counter()
    while queue or instance.live:
        if queue and instance.free_slots:
            admit = [queue.popleft() for _ in range(min(instance.free_slots, len(queue)))]
            bar.update(len(instance.add(admit)), instance.stats.emitted, time.perf_counter() - start)
        bar.update(len(instance.step()), instance.stats.emitted, time.perf_counter() - start)
    bar.close()
