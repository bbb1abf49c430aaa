"""Train a draft model to match the policy's next-token distributions (top-k KL), and build one."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from rlhfspec.distill.teacher import Example
from rlhfspec.models.batch import hidden_states, padded_batch
from rlhfspec.models.config import ModelConfig
from rlhfspec.models.llama import Transformer


def draft_config(policy: ModelConfig, layers: int, hidden: int) -> ModelConfig:
    """A small Llama with the policy's vocabulary, positions and tokens; 64-wide heads."""
    heads = max(1, hidden // 64)
    hf = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": policy.vocab_size, "hidden_size": hidden,
        "intermediate_size": int(math.ceil(hidden * 8 / 3 / 64) * 64),
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
        "head_dim": hidden // heads, "rms_norm_eps": policy.rms_norm_eps, "rope_theta": policy.rope["rope_theta"],
        "max_position_embeddings": policy.max_position_embeddings, "tie_word_embeddings": True,
        "bos_token_id": policy.bos_token_id, "eos_token_id": list(policy.eos_token_ids) or None, "hidden_act": "silu",
    }
    return ModelConfig.from_hf(hf, source="draft config")


def init_weights(module: torch.nn.Module, gen: torch.Generator) -> None:
    """A fresh start for a model trained from scratch: norms 1, biases 0, other weights N(0, 0.02^2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def new_draft(policy, layers: int, hidden: int, seed: int = 0) -> Transformer:
    """A freshly initialised draft whose (tied) embeddings are the policy's, projected onto their
    top `hidden` principal directions, so its output layer starts out speaking the policy's vocabulary."""
    config = draft_config(policy.config, layers, hidden)
    gen = torch.Generator().manual_seed(seed)
    draft = Transformer(config, dtype=torch.float32)
    with torch.no_grad():
        init_weights(draft, gen)
        emb = policy.embed.weight.detach().float().cpu()
        _, _, vh = torch.linalg.svd(emb - emb.mean(0), full_matrices=False)
        proj = emb @ vh[:hidden].T
        # Rows of mean norm 1 give unit-scale initial logits (the output layer is tied).
        draft.embed.weight.copy_(proj / proj.norm(dim=1).mean())
    return draft


@dataclass(slots=True)
class DistillConfig:
    # Measured on 768 policy responses, 150 s of training, held-out single-token acceptance at
    # temperature 1: lr 5e-4 0.46, 1e-3 0.49, 2e-3 0.40, 4e-3 0.31.
    lr: float = 1e-3
    batch_sequences: int = 16
    weight_decay: float = 0.0
    max_steps: int = 400
    seconds: float = 420.0
    seed: int = 0


class Distiller:
    """Holds a draft model and its optimizer; `fit` trains on teacher examples for a step or time budget.

    Loss per response position: cross-entropy of the draft against the teacher's top-k
    distribution, sum_i p_i (log p_i - log q_i) over the top-k, which is the KL to the teacher up
    to the mass outside the top-k. With a draft vocabulary, q is a softmax over those ids only.
    """

    def __init__(self, draft: Transformer, config: DistillConfig | None = None, draft_vocab: list[int] | None = None):
        self.draft, self.config = draft, config or DistillConfig()
        self.vocab = None if draft_vocab is None else torch.tensor(sorted(draft_vocab), device=draft.device)
        self.optimizer = torch.optim.AdamW(draft.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.rng = random.Random(self.config.seed)
        self.steps = 0

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """Mean over response positions of -sum_{i in teacher top-k} p_i log q_i."""
        ids, mask = padded_batch([e.tokens for e in batch])
        hidden = hidden_states(self.draft, ids, mask)
        # One output-layer matmul over every response position of the batch (it dominates the cost).
        rows = torch.cat([hidden[r, e.start - 1 : len(e.tokens) - 1] for r, e in enumerate(batch)])
        top_ids = torch.cat([e.top_ids for e in batch]).to(rows.device)  # the examples stay on the CPU
        p = torch.cat([e.top_logprobs for e in batch]).to(rows.device).exp()
        if self.vocab is not None:
            top_ids = _to_local(top_ids, self.vocab)
        valid = top_ids >= 0
        logq = self._log_q(rows).gather(-1, top_ids.clamp(min=0))
        return -(p * logq * valid).sum() / max(rows.shape[0], 1)

    def _log_q(self, h: torch.Tensor) -> torch.Tensor:
        d = self.draft
        if self.vocab is None:
            return torch.log_softmax(d.logits(h), dim=-1)
        head = d.embed.weight[self.vocab]
        return torch.log_softmax(d.normed(h) @ head.T, dim=-1)

    def fit(self, examples: list[Example], log=None) -> list[float]:
        """Train until max_steps or the time budget; returns the loss per step (cosine LR decay)."""
        # Softmax gradients over a 49k vocabulary are mostly denormal floats, which the CPU handles
        # an order of magnitude slower; flushing them to zero changes nothing that matters here.
        flushed = torch.set_flush_denormal(True)
        try:
            return self._fit(examples, log)
        finally:
            if flushed:
                torch.set_flush_denormal(False)

    def _fit(self, examples: list[Example], log=None) -> list[float]:
        cfg = self.config
        self.draft.train().requires_grad_(True)
        losses, start = [], time.perf_counter()
        order: list[int] = []
        for step in range(cfg.max_steps):
            # Cosine decay to 30% of the peak over whichever budget, steps or seconds, runs out first
            # (decaying to zero wasted the last minutes: measured lower held-out agreement).
            elapsed = time.perf_counter() - start
            progress = max(step / cfg.max_steps, elapsed / cfg.seconds)
            if progress >= 1 or (step and elapsed * (step + 1) / step > cfg.seconds):
                break  # the budget is spent, or the next step, as long as the mean one so far, would pass it
            if len(order) < cfg.batch_sequences:
                order = list(range(len(examples)))
                self.rng.shuffle(order)
            batch = [examples[order.pop()] for _ in range(min(cfg.batch_sequences, len(order)))]
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * (0.3 + 0.35 * (1 + math.cos(math.pi * progress)))
            loss = self.loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.draft.parameters(), 1.0)
            self.optimizer.step()
            self.steps += 1
            losses.append(loss.item())
            if log and step % 20 == 0:
                log(f"distill step {step}: loss {losses[-1]:.3f} ({time.perf_counter() - start:.0f} s)")
        self.draft.eval().requires_grad_(False)
        return losses


def _to_local(ids: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Global token ids -> positions in the sorted draft vocabulary (-1 where absent)."""
    pos = torch.searchsorted(vocab, ids).clamp(max=len(vocab) - 1)
    return torch.where(vocab[pos] == ids, pos, torch.full_like(pos, -1))


def frequent_tokens(examples: list[Example], k: int, always: tuple[int, ...] = ()) -> list[int]:
    """The k token ids carrying the most teacher probability mass over the examples (plus `always`)."""
    mass: dict[int, float] = {}
    for e in examples:
        for tid, lp in zip(e.top_ids.flatten().tolist(), e.top_logprobs.exp().flatten().tolist()):
            mass[tid] = mass.get(tid, 0.0) + lp
    ranked = sorted(mass, key=mass.get, reverse=True)
    chosen = list(dict.fromkeys(list(always) + ranked))[:k]
    return sorted(chosen)
