"""One sample's state in a generation instance, and what `generate` returns for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhfspec.engine.sampling import SamplingParams, keyed_uniforms, seed_tensor


@dataclass(slots=True)
class Trace:
    """What a drafter refresh learns from, kept while a sample is generated (an instance with
    `keep_targets` k > 0): before each emitted token, the top k of the policy's next-token logprobs
    at temperature 1 (whatever the sampling settings); and, on an instance whose drafters read
    features, the features of every row its cache keeps, in position order (the last emitted token,
    never fed, has none)."""

    top_ids: list[torch.Tensor] = field(default_factory=list)  # chunks [m, k], int64
    top_logprobs: list[torch.Tensor] = field(default_factory=list)  # chunks [m, k], float32
    features: list[torch.Tensor] = field(default_factory=list)  # chunks [r, H], the engine's dtype

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(top ids, top logprobs), a row per emitted token."""
        return torch.cat(self.top_ids), torch.cat(self.top_logprobs)

    def compact(self) -> None:
        """Each list as one tensor of its own, before the Trace leaves its instance: the chunks are
        views of whole steps' tensors, which pickling copies whole (a default-run rollout's 64
        traces took 106 MB pickled, 21.8 MB compacted)."""
        for name in ("top_ids", "top_logprobs", "features"):
            chunks = getattr(self, name)
            if chunks:
                setattr(self, name, [torch.cat(chunks)])


@dataclass(slots=True)
class Sequence:
    """A prompt being completed. Its randomness is keyed by (seed, sample_id, position) alone.

    Invariant while live: the instance's cache holds len(prompt) + len(tokens) - 1 rows;
    the last emitted token is fed at the next step.
    """

    sample_id: int
    prompt: list[int]
    params: SamplingParams
    seed: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int = -1
    trace: Trace | None = None

    @property
    def length(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt) + len(self.tokens)

    @property
    def remaining(self) -> int:
        """Tokens it may still emit."""
        return self.params.max_new_tokens - len(self.tokens)


def first_with_prompt(prompts: list[list[int]]) -> list[int]:
    """For each prompt, the index of its first occurrence in `prompts`: samples of one prompt (a
    GRPO/RLOO group) admitted together share one prefill."""
    first: dict[tuple[int, ...], int] = {}
    return [first.setdefault(tuple(p), i) for i, p in enumerate(prompts)]


def prefill_leaders(seqs: list[Sequence]) -> tuple[list[int], list[Sequence]]:
    """Samples admitted together: for each, the index of the one whose prefill it shares, and the
    samples whose prompts are computed (the first of each prompt), in order."""
    leader = first_with_prompt([s.prompt for s in seqs])
    return leader, [s for i, s in enumerate(seqs) if leader[i] == i]


def uniforms(seqs: list[Sequence], positions: list[int], purpose: int, device) -> torch.Tensor:
    """The keyed uniform of each sample at its position: (seed, sample_id, position, purpose) alone."""
    return keyed_uniforms(
        seed_tensor([s.seed for s in seqs], device),
        torch.tensor([s.sample_id for s in seqs], device=device),
        torch.tensor(positions, device=device),
        purpose,
    )


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    """A finished sample: generated token ids, their logprobs under the processed distribution, why it stopped."""

    sample_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens)
    trace: Trace | None = None  # the engine's targets and features, when it kept them (EngineSpec.keep_targets)

    @classmethod
    def of(cls, seq: Sequence) -> GenerationOutput:
        return cls(seq.sample_id, seq.prompt, seq.tokens, seq.logprobs, seq.finish_reason, seq.trace)
