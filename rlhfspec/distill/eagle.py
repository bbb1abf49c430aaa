"""Training an eagle head on the policy's own rollouts: build one, and fit it (forward KL over the
draft vocabulary plus feature regression, as in EAGLE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfspec.distill.teacher import Example
from rlhfspec.distill.train import DistillConfig, Distiller, _to_local, init_weights
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.attention import DenseAttention, fold_queries, unfold_output
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
    init_weights(head, gen)
    with torch.no_grad():
        head.fc.weight[:, :h] += torch.eye(h)
        head.readout.weight.copy_(policy.head_weight.detach().float().cpu()[head.vocab])
    return head


@dataclass(slots=True)
class EagleConfig(DistillConfig):
    # EAGLE weighs the feature regression 10x the classification; here the classification is
    # what acceptance follows, so both count alike by default.
    feature_weight: float = 1.0
    feature_noise: float = 0.0  # std of Gaussian noise on the input features (EAGLE's robustness trick)
    unroll: bool = False  # also train the second link of chains, from the head's own predicted features
    # What the classification term is: "kl" (cross-entropy to the teacher's top-k, EAGLE's), "tv"
    # (minus sum_i min(p_i, q_i) over the top-k: the acceptance itself, DistillSpec's total-variation
    # objective) or "kl+tv" (both).
    objective: str = "kl"


class EagleDistiller(Distiller):
    """A Distiller whose model is an eagle head reading the policy's features (examples made with
    teacher_examples(..., features=True)); the policy's embeddings are read, never trained."""

    def __init__(self, head: EagleHead, policy, config: EagleConfig | None = None):
        super().__init__(head, config or EagleConfig(), draft_vocab=head.vocab.tolist())
        if self.config.objective not in ("kl", "tv", "kl+tv"):
            raise RlhfspecError(f"the eagle head's objective {self.config.objective!r} is not kl, tv or kl+tv.")
        self.policy = policy
        self.parts: dict[str, float] = {}

    @property
    def head(self) -> EagleHead:
        return self.draft

    def loss(self, batch: list[Example]) -> torch.Tensor:
        """Mean over response positions of -sum_{i in teacher top-k} p_i log q_i, plus feature_weight
        times the smooth-L1 distance of every predicted feature to the policy's; with `unroll`, the
        same again for the second link of a chain (input: the head's own predicted feature)."""
        head, cfg = self.head, self.config
        dev = head.device  # the examples stay on the CPU; the head may not
        ids, mask = padded_batch([e.tokens for e in batch])
        b, t = ids.shape
        feats = torch.zeros(b, t, head.hidden_size)
        for r, e in enumerate(batch):
            feats[r, : len(e.tokens)] = e.features
        ids, mask, feats = ids.to(dev), mask.to(dev), feats.to(dev)
        # Head input t is (f_t, x_{t+1}); it predicts f_{t+1} and the distribution of x_{t+2}.
        inputs, targets, valid = feats[:, :-1], feats[:, 1:], mask[:, 1:]
        if cfg.feature_noise and head.training:
            inputs = inputs + torch.randn(inputs.shape, generator=self.noise).to(dev) * cfg.feature_noise
        head.ensure_positions(t)
        embeds = F.embedding(ids[:, 1:], self.policy.embed.weight.detach().float().to(dev)).reshape(-1, head.hidden_size)
        out, out2 = chain_links(head, inputs, embeds, valid, cfg.unroll)
        ce, regression = self._terms(batch, out, targets, valid.bool(), skip=0)
        self.parts = {"ce": ce.item(), "feature": regression.item()}
        total = ce + cfg.feature_weight * regression
        if out2 is not None:
            ce2, regression2 = self._terms(batch, out2, targets, valid.bool(), skip=1)
            self.parts |= {"ce2": ce2.item(), "feature2": regression2.item()}
            total = total + ce2 + cfg.feature_weight * regression2
        return total

    def _terms(self, batch: list[Example], out: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, skip: int):
        """(top-k cross-entropy over response positions, feature regression) of the head's outputs
        out [B, T-1, H], leaving out each sequence's first `skip` inputs."""
        keep = keep.clone()
        keep[:, :skip] = False
        regression = F.smooth_l1_loss(out[keep], targets[keep])
        rows, top_ids, top_lp = [], [], []
        for r, e in enumerate(batch):
            first = max(e.start - 2, skip)  # the first input whose prediction is a response token
            rows.append(out[r, first : len(e.tokens) - 2])
            top_ids.append(e.top_ids[first - (e.start - 2) :])
            top_lp.append(e.top_logprobs[first - (e.start - 2) :])
        rows = torch.cat(rows)
        local = _to_local(torch.cat(top_ids).to(rows.device), self.vocab)
        p = torch.cat(top_lp).to(rows.device).exp()
        logq = torch.log_softmax(self.head.logits(rows), dim=-1).gather(-1, local.clamp(min=0))
        known = local >= 0
        n = max(rows.shape[0], 1)
        terms = {"kl": lambda: -(p * logq * known).sum() / n,
                 "tv": lambda: -(torch.minimum(p, logq.exp()) * known).sum() / n}
        return sum(terms[part]() for part in self.config.objective.split("+")), regression

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


def chain_links(head: EagleHead, inputs: torch.Tensor, embeds: torch.Tensor, valid: torch.Tensor, second: bool):
    """The head over padded inputs: features [B, T, H], embeds [B*T, H], valid [B, T] -> its
    predictions [B, T, H] from the real features, and (if `second`) those of a chain's second
    link: input t reads the prediction of f_t (from input t - 1) and attends to the first pass's
    rows before t and to itself, as the second draft of a chain does (input 0 keeps f_0)."""
    b, t, h = inputs.shape
    dense = DenseAttention(valid, head.config.num_heads, head.config.num_kv_heads)
    recorded = _Recording(dense)
    out = head(inputs.reshape(-1, h), embeds, dense.positions, recorded).view(b, t, -1)
    if not second:
        return out, None
    predicted = torch.cat((inputs[:, :1], out[:, :-1]), dim=1)
    out2 = head(predicted.reshape(-1, h), embeds, dense.positions, _SecondLink(recorded, valid)).view(b, t, -1)
    return out, out2


class _Recording:
    """An attention that remembers the keys and values it saw (the head has one layer)."""

    def __init__(self, inner: DenseAttention):
        self.inner, self.invariant, self.positions = inner, inner.invariant, inner.positions

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k, self.v = k, v
        return self.inner(layer, q, k, v)


class _SecondLink:
    """Attention for the unrolled second link: query t sees the first pass's keys before t and its own."""

    invariant = False

    def __init__(self, first: _Recording, valid: torch.Tensor):
        b, t = valid.shape
        self.batch, self.qlen, self.first, self.positions = b, t, first, first.positions
        before = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril(-1)[None] & valid.bool()[:, None, :]
        own = torch.eye(t, dtype=torch.bool, device=valid.device)[None].expand(b, t, t)
        self.mask = torch.cat((before, own), dim=-1)[:, None]

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, t, hkv = self.batch, self.qlen, k.shape[1]
        keys = torch.cat((self.first.k, k)).view(2, b, t, hkv, -1).permute(1, 3, 0, 2, 4).reshape(b, hkv, 2 * t, -1)
        values = torch.cat((self.first.v, v)).view(2, b, t, hkv, -1).permute(1, 3, 0, 2, 4).reshape(b, hkv, 2 * t, -1)
        mask = self.mask.repeat(1, 1, q.shape[1] // hkv, 1)
        out = F.scaled_dot_product_attention(fold_queries(q, b, t, hkv), keys, values, attn_mask=mask)
        return unfold_output(out, b, t)
