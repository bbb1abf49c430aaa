"""`generate`: complete many prompts with continuous batching on one generation instance."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence as Seq
from pathlib import Path

from rlhfspec.engine.drafters import DraftModelDrafter, Drafter, NgramDrafter
from rlhfspec.engine.instance import GenerationInstance
from rlhfspec.engine.progress import Progress
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.engine.sequence import GenerationOutput, Sequence
from rlhfspec.errors import RlhfspecError
from rlhfspec.strategy.base import StaticStrategy, Strategy

DEFAULT_MAX_BATCH = 64
MAX_DRAFT_TOKENS = 16


def checked_sample_ids(sample_ids: Seq[int] | None, n: int) -> list[int]:
    """The ids keying each prompt's randomness: 0..n-1 by default, else n distinct integers."""
    ids = list(range(n)) if sample_ids is None else list(sample_ids)
    if len(set(ids)) != len(ids) or len(ids) != n:
        raise RlhfspecError(f"sample_ids must be {n} distinct integers, one per prompt.")
    return ids


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
    drafter=None,
    num_draft_tokens: int | str | None = None,
    strategy: Strategy | str | None = None,
    instance_stats: list | None = None,
    batch_invariant: bool = True,
) -> list[GenerationOutput]:
    """Complete each prompt (token ids); outputs in prompt order.

    Up to `batch_size` samples run at once (default min(#prompts, 64)); a finished sample's slot
    is refilled from the queue. Sample i's randomness is keyed by (seed, sample_ids[i], position)
    (sample_ids default to 0..n-1), so its tokens do not depend on batch_size or on which other
    prompts run beside it.

    drafter: None, "ngram", a draft model path, a model from `load_model`, a `Drafter`, or a list
    of these; num_draft_tokens: draft length per step (default 4), or "auto" to let the adaptive
    strategy pick the drafter and length at every step (as strategy="adaptive" does). Speculative
    decoding is lossless: the tokens follow the policy's own sampling distribution and `logprobs`
    are the policy's.

    batch_invariant (default): every row's logits are bitwise the same whatever else is in the
    step, so a sample's tokens do not depend on its batch on any CPU; False takes the faster
    kernels, under which tokens agree except where a last-bit difference flips a near-tie.
    """
    params = params or SamplingParams()
    if not prompts_token_ids:
        return []
    for i, p in enumerate(prompts_token_ids):
        if isinstance(p, str) or not all(isinstance(t, int) or (hasattr(t, "__index__") and not isinstance(t, float)) for t in p):
            raise RlhfspecError(f"prompt {i} is {type(p).__name__} {str(p)[:40]!r}, not a list of token ids; "
                                "encode text first (rlhfspec.data.chat.encode_prompt(tokenizer, text)).")
    ids = checked_sample_ids(sample_ids, len(prompts_token_ids))
    seqs = [Sequence(sample_id=ids[i], prompt=[int(t) for t in p], params=params, seed=seed) for i, p in enumerate(prompts_token_ids)]
    longest = max(len(s.prompt) for s in seqs)
    limit = model.config.max_position_embeddings
    if longest + params.max_new_tokens > limit:
        worst = max(seqs, key=lambda s: len(s.prompt))
        raise RlhfspecError(
            f"prompt {worst.sample_id} is {len(worst.prompt)} tokens; with max_new_tokens {params.max_new_tokens} "
            f"it exceeds the model's {limit} positions."
        )
    specs = [] if drafter is None else list(drafter) if isinstance(drafter, (list, tuple)) else [drafter]
    drafters = [make_drafter(d, model, tokenizer) for d in specs]
    if len({d.name for d in drafters}) != len(drafters):
        raise RlhfspecError(f"drafters need distinct names; got {[d.name for d in drafters]}.")
    if strategy == "adaptive" or num_draft_tokens == "auto":
        strategy = adaptive_strategy(model, drafters)
    elif isinstance(strategy, str):
        raise RlhfspecError(f"strategy {strategy!r} is not 'adaptive' or a Strategy object.")
    elif strategy is None and drafters:
        n = 4 if num_draft_tokens is None else num_draft_tokens
        check_draft_length(n)
        strategy = StaticStrategy(drafters[0].name, n)
    batch = min(batch_size or DEFAULT_MAX_BATCH, len(seqs))
    instance = GenerationInstance(model, batch, longest + params.max_new_tokens, tokenizer=tokenizer, drafters=drafters,
                                  strategy=strategy, batch_invariant=batch_invariant)
    for s in seqs:
        instance.validate(s)
    run(instance, seqs, progress=progress)
    if instance_stats is not None:
        instance_stats.append(instance.stats)
    return [GenerationOutput.of(s) for s in seqs]


def adaptive_strategy(policy, drafters: list[Drafter], max_n: int = 8) -> Strategy:
    """The workload-aware selector over these drafters, with a cached cost profile (about 10 s the first time)."""
    from rlhfspec.engine.profile import cost_model
    from rlhfspec.models.loader import default_cache_dir
    from rlhfspec.strategy.selector import AdaptiveStrategy

    if not drafters:
        raise RlhfspecError("the adaptive strategy needs at least one drafter (drafter='ngram', a draft model, or a list).")
    return AdaptiveStrategy(cost_model(policy, {d.name: d for d in drafters}, default_cache_dir()), max_n=max_n)


def check_draft_length(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise RlhfspecError(f"num_draft_tokens is {n!r}; it must be an integer >= 0.")
    if n > MAX_DRAFT_TOKENS:
        raise RlhfspecError(f"num_draft_tokens is {n}; the maximum is {MAX_DRAFT_TOKENS}.")


def make_drafter(spec, policy, tokenizer=None) -> Drafter:
    """A Drafter from "ngram", a checkpoint path, a loaded model, or a Drafter."""
    if isinstance(spec, Drafter):
        return spec
    if spec == "ngram":
        return NgramDrafter()
    if isinstance(spec, (str, Path)):
        try:
            return DraftModelDrafter.load(spec, policy, policy_tokenizer=tokenizer)
        except RlhfspecError as e:
            raise RlhfspecError(f"drafter {spec}: {e}") from None
    if hasattr(spec, "config") and hasattr(spec, "plan"):
        return DraftModelDrafter(spec, policy)
    raise RlhfspecError(f"drafter {spec!r} is not 'ngram', a draft model path, a model from load_model, or a Drafter.")


def run(instance: GenerationInstance, seqs: list[Sequence], progress: bool = False) -> None:
    """Drive an instance until every sample has finished, admitting queued samples into free slots."""
    queue = deque(seqs)
    bar = Progress(total=len(seqs), enabled=progress)
    start = time.perf_counter()
    while queue or instance.live:
        if queue and instance.free_slots:
            admit = [queue.popleft() for _ in range(min(instance.free_slots, len(queue)))]
            done = len(instance.add(admit))
        else:
            done = 0
        done += len(instance.step())
        bar.update(done, instance.stats.emitted, time.perf_counter() - start, instance.stats.acceptance)
    bar.close()
