"""Training an eagle head on the policy's own rollouts: build one, and fit it (forward KL over the
draft vocabulary plus feature regression, as in EAGLE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfspec.distill.teacher import Example
from rlhfspec.distill.train import DistillConfig, Distiller, _to_local
from rlhfspec.models.attention import DenseAttention
from rlhfspec.models.batch import hidden_states, padded_batch
from rlhfspec.models.eagle import EagleHead, head_config


def new_head(policy, vocab: list[int], seed: int = 0) -> EagleHead:
    """A float32 head for this policy: its layer freshly initialised, fc passing the feature
    through (so the head starts from "the next feature is this one"), and the readout the
    policy's own output rows for the draft vocabulary."""
    config = head_config(policy.config, len(vocab))
    head = EagleHead(config, vocab, policy.config.vocab_size, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    h = config.hidden_size
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        head.fc.weight[:, :h] += torch.eye(h)
        head.readout.weight.copy_(policy.head_weight.detach().float().cpu()[head.vocab])
    return head


@dataclass(slots=True)
class EagleConfig(DistillConfig):
    # EAGLE weighs the feature regression 10x the classification; here the classification is
    # what acceptance follows, so both count alike by default.
    feature_weight: float = 1.0
    feature_noise: float = 0.0  # std of Gaussian noise on the input features (EAGLE's robustness trick)


class EagleDistiller(Distiller):
    """A Distiller whose model is an eagle head reading the policy's features (examples made with
    teacher_examples(..., features=True)); the policy's embeddings are read, never trained."""

    def __init__(self, head: EagleHead, policy, config: EagleConfig | None = None):
        super().__init__(head, config or EagleConfig(), draft_vocab=head.vocab.tolist())
        self.policy = policy
        self.parts: dict[str, float] = {}

    @property
    def head(self) -> EagleHead:
        return self.draft

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """Mean over response positions of -sum_{i in teacher top-k} p_i log q_i, plus feature_weight
        times the smooth-L1 distance of every predicted feature to the policy's."""
        head, cfg = self.head, self.config
        ids, mask = padded_batch([e.tokens for e in batch])
        b, t = ids.shape
        feats = torch.zeros(b, t, head.hidden_size)
        for r, e in enumerate(batch):
            feats[r, : len(e.tokens)] = e.features
        # Head input t is (f_t, x_{t+1}); it predicts f_{t+1} and the distribution of x_{t+2}.
        inputs, targets, valid = feats[:, :-1], feats[:, 1:], mask[:, 1:]
        if cfg.feature_noise and head.training:
            inputs = inputs + torch.randn(inputs.shape, generator=self.noise) * cfg.feature_noise
        head.ensure_positions(t)
        att = DenseAttention(valid, head.config.num_heads, head.config.num_kv_heads)
        embeds = F.embedding(ids[:, 1:], self.policy.embed.weight.detach().float().cpu())
        out = head(inputs.reshape(-1, head.hidden_size), embeds.reshape(-1, head.hidden_size), att.positions, att).view(b, t - 1, -1)
        keep = valid.bool()
        regression = F.smooth_l1_loss(out[keep], targets[keep])
        rows, top_ids, top_lp = [], [], []
        for r, e in enumerate(batch):
            first = max(e.start - 2, 0)  # the first input whose prediction is a response token
            rows.append(out[r, first : len(e.tokens) - 2])
            top_ids.append(e.top_ids[first - (e.start - 2) :])
            top_lp.append(e.top_logprobs[first - (e.start - 2) :])
        rows = torch.cat(rows)
        local = _to_local(torch.cat(top_ids), self.vocab)
        p = torch.cat(top_lp).exp()
        logq = torch.log_softmax(head.logits(rows), dim=-1).gather(-1, local.clamp(min=0))
        ce = -(p * logq * (local >= 0)).sum() / max(rows.shape[0], 1)
        self.parts = {"ce": ce.item(), "feature": regression.item()}
        return ce + cfg.feature_weight * regression

    def fit(self, examples: list[Example], log=None) -> list[float]:
        self.noise = torch.Generator().manual_seed(self.config.seed + self.steps)
        return super().fit(examples, log)


@torch.no_grad()
def expected_acceptance(policy, head: EagleHead, sequences: list[list[int]], starts: list[int], micro_batch: int = 8) -> float:
    """Mean over response positions of sum_x min(p(x), q(x)) at temperature 1: the exact acceptance
    probability of the head's first draft token (read from the policy's real features)."""
    total, count = 0.0, 0
    vocab = head.vocab
    for i in range(0, len(sequences), micro_batch):
        seqs, sts = sequences[i : i + micro_batch], starts[i : i + micro_batch]
        hidden = hidden_states(policy, *padded_batch(seqs))
        for row, (s, st) in enumerate(zip(seqs, sts)):
            first = max(st - 2, 0)
            if first >= len(s) - 2:
                continue
            h = hidden[row, : len(s)]
            feats = policy.normed(h)
            # Input t = (f_t, x_{t+1}) predicts x_{t+2} ~ p(. | x_<=t+1), the policy's row t+1.
            head.ensure_positions(len(s))
            att = DenseAttention(torch.ones(1, len(s) - 1, dtype=torch.long), head.config.num_heads, head.config.num_kv_heads)
            embeds = F.embedding(torch.tensor(s[1:]), policy.embed.weight)
            out = head(feats[:-1], embeds, att.positions, att)[first : len(s) - 2]
            q = torch.softmax(head.logits(out), dim=-1)
            p = torch.softmax(policy.logits(h[first + 1 : len(s) - 1]), dim=-1)
            total += torch.minimum(p[:, vocab], q).sum().item()
            count += q.shape[0]
    return total / max(count, 1)
