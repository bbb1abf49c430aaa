"""Variants of the eagle head's training on the same rollouts and time budget (a probe for [draft]).

    .venv/bin/python benchmarks/eagle_variants.py [--source rl-style|self-instruct] [--train-prompts P]
        [--subset N] [--extra-text C] [--seconds S] [--cache DIR] [--json PATH] VARIANT...

VARIANT: `base` (what `rlhfspec distill-draft --kind eagle` trains), `fused` (EAGLE-3's input: the
outputs of layers 2 and 15, RMS-normalised, beside the final feature, mapped to one feature by a
learned layer that starts as the final feature's pass-through), `frozen` (the readout kept at the
policy's own output rows, as EAGLE-1 does), `frozenX` (that, plus Gaussian noise of std X on the
input features), `tv` (the classification term minus the acceptance over the teacher's top-k, sum_i
min(p_i, q_i), instead of the cross-entropy), `kl+tv` (both terms). Every variant trains for
--seconds on the first --subset of the --train-prompts training rollouts (all by default; 640, as
`distill-draft`, unless told) and reports the expected acceptance of one draft token at temperature 1
(mean sum_x min(p, q)) on the 24 held-out rollouts of `distill-draft` (prompts none of the training
prompts), on 24 new rollouts of training prompts (what `distill-draft` held out before 2026-11-29)
and on 24 of its training rollouts. --source self-instruct trains on the policy's answers to prompts
it wrote itself (benchmarks/self_instruct.py) instead of RL-style ones; --extra-text C adds C
chunks of 128 tokens of the Python standard library's files to the training text. Rollouts and teacher
targets are cached in --cache, so variants run later see the same text.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from rlhfspec import load_model
from rlhfspec.distill.eagle import EagleConfig, EagleDistiller, chain_links, new_head
from rlhfspec.distill.run import policy_rollouts
from rlhfspec.distill.teacher import Example
from rlhfspec.distill.train import frequent_tokens
from rlhfspec.models.attention import DenseAttention
from rlhfspec.models.batch import padded_batch
from rlhfspec.models.linear import Linear
from rlhfspec.models.llama import decoder_layer, rms_norm
from self_instruct import self_instruct_prompts  # beside this script

FUSED_LAYERS = (2, 15)


def features_by_layer(policy, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden [B, T, H], [layer 2, layer 15, final feature] [B, T, 3H]) of padded sequences."""
    ids, mask = padded_batch(seqs)
    b, t = ids.shape
    c = policy.config
    policy.ensure_positions(t)
    att = DenseAttention(mask, c.num_heads, c.num_kv_heads)
    x = F.embedding(ids.reshape(-1), policy.embed.weight)
    cos, sin = policy.rope_cos[att.positions].unsqueeze(1), policy.rope_sin[att.positions].unsqueeze(1)
    kept = []
    for i, layer in enumerate(policy.plan(False).layers):
        x = decoder_layer(x, layer, i, cos, sin, att, c)
        if i in FUSED_LAYERS:
            kept.append(rms_norm(x, torch.ones(c.hidden_size), c.rms_norm_eps))
    return x.view(b, t, -1), torch.cat(kept + [policy.normed(x)], -1).view(b, t, -1)


@torch.no_grad()
def examples(policy, seqs: list[list[int]], starts: list[int], k: int = 32) -> list[Example]:
    """teacher_examples' top-k targets, with all three features per position."""
    out = []
    for i in range(0, len(seqs), 8):
        hidden, fused = features_by_layer(policy, seqs[i : i + 8])
        for r, (s, st) in enumerate(zip(seqs[i : i + 8], starts[i : i + 8])):
            top = torch.log_softmax(policy.logits(hidden[r, st - 1 : len(s) - 1]), -1).topk(k, -1)
            out.append(Example(s, st, top.indices, top.values, fused[r, : len(s)].clone()))
    return out


class VariantDistiller(EagleDistiller):
    """EagleDistiller whose examples may carry [low, mid, final] features: with `fused` the head reads
    fuse(all three); the feature-regression target is always the final feature."""

    def __init__(self, head, policy, config: EagleConfig, fused: bool, frozen_readout: bool):
        h = head.hidden_size
        self.fused = fused
        if fused:
            head.fuse = Linear((len(FUSED_LAYERS) + 1) * h, h, False, torch.float32, "cpu")
            with torch.no_grad():
                head.fuse.weight.normal_(0, 0.02)
                head.fuse.weight[:, -h:] = torch.eye(h)
        super().__init__(head, policy, config)
        if frozen_readout:
            params = [p for n, p in head.named_parameters() if not n.startswith("readout")]
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        h = self.head.hidden_size
        return F.linear(features, self.head.fuse.weight) if self.fused else features[..., -h:]

    def loss(self, batch: list[Example]) -> torch.Tensor:
        head, cfg, h = self.head, self.config, self.head.hidden_size
        ids, mask = padded_batch([e.tokens for e in batch])
        b, t = ids.shape
        feats = torch.zeros(b, t, batch[0].features.shape[1])
        for r, e in enumerate(batch):
            feats[r, : len(e.tokens)] = e.features
        inputs, targets, valid = self.inputs(feats[:, :-1]), feats[:, 1:, -h:], mask[:, 1:]
        if cfg.feature_noise and head.training:
            inputs = inputs + torch.randn(inputs.shape, generator=self.noise) * cfg.feature_noise
        head.ensure_positions(t)
        embeds = F.embedding(ids[:, 1:], self.policy.embed.weight).reshape(-1, h)
        out, _ = chain_links(head, inputs, embeds, valid, False)
        ce, regression = self._terms(batch, out, targets, valid.bool(), skip=0)
        return ce + cfg.feature_weight * regression

    @torch.no_grad()
    def expected_acceptance(self, seqs: list[list[int]], starts: list[int]) -> float:
        """As distill.eagle.expected_acceptance, through this variant's input."""
        head, policy = self.head, self.policy
        total, count = 0.0, 0
        for i in range(0, len(seqs), 8):
            hidden, fused = features_by_layer(policy, seqs[i : i + 8])
            for r, (s, st) in enumerate(zip(seqs[i : i + 8], starts[i : i + 8])):
                first = max(st - 2, 0)
                if first >= len(s) - 2:
                    continue
                head.ensure_positions(len(s))
                att = DenseAttention(torch.ones(1, len(s) - 1, dtype=torch.long), head.config.num_heads, head.config.num_kv_heads)
                embeds = F.embedding(torch.tensor(s[1:]), policy.embed.weight)
                out = head(self.inputs(fused[r, : len(s) - 1]), embeds, att.positions, att)[first : len(s) - 2]
                q = torch.softmax(head.logits(out), -1)
                p = torch.softmax(policy.logits(hidden[r, first + 1 : len(s) - 1]), -1)
                total += torch.minimum(p[:, head.vocab], q).sum().item()
                count += q.shape[0]
        return total / max(count, 1)


def stdlib_chunks(tok, n: int, length: int = 128, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """n chunks of `length` tokens of the Python standard library's own files (code, docstrings,
    comments; pydoc_data/topics.py is English prose), each framed as the assistant's answer to one
    request, as (sequences, where each answer starts): text the policy did not write, on every machine."""
    import random
    import sysconfig
    from pathlib import Path

    from rlhfspec.data.chat import encode_prompt

    prompt = encode_prompt(tok, "Write some Python code and explain it.")
    chunks = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        ids = tok.encode(path.read_text(errors="ignore"), add_special_tokens=False)
        chunks += [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
    random.Random(seed).shuffle(chunks)
    return [prompt + c for c in chunks[:n]], [len(prompt)] * min(n, len(chunks))


def cached(path: str, make):
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    value = make()
    torch.save(value, path)
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--train-prompts", type=int, default=640, help="rollouts to make and cache (distill-draft's default: 640)")
    ap.add_argument("--source", default="rl-style", choices=("rl-style", "self-instruct"),
                    help="training prompts: RL-style ones, or requests the policy writes (benchmarks/self_instruct.py)")
    ap.add_argument("--instruct-temperature", type=float, default=0.5, help="self-instruct: the temperature the policy writes prompts at")
    ap.add_argument("--extra-text", type=int, default=0,
                    help="also train on this many 128-token chunks of the Python standard library's files (text the policy did not write)")
    ap.add_argument("--subset", type=int, default=0, help="train on the first N rollouts only (0: all)")
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--cache", default="/tmp/eagle_variants")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    torch.manual_seed(0)
    policy, tok = load_model("default", dtype="float32")
    policy.requires_grad_(False)
    suffix = ("" if args.train_prompts == 640 else f"_{args.train_prompts}") + ("" if args.source == "rl-style" else f"_self_instruct_t{args.instruct_temperature:g}")
    source = None if args.source == "rl-style" else lambda n, seed: self_instruct_prompts(policy, tok, n, seed, temperature=args.instruct_temperature)
    train = cached(f"{args.cache}/train{suffix}.pt", lambda: policy_rollouts(policy, tok, args.train_prompts, 128, 0, log=print, source=source))
    held = cached(f"{args.cache}/held_new_prompts.pt", lambda: policy_rollouts(policy, tok, 24, 128, 10_000, log=print, heldout=True))
    held_same = cached(f"{args.cache}/held.pt", lambda: policy_rollouts(policy, tok, 24, 128, 10_000, log=print))
    exs = cached(f"{args.cache}/examples{suffix}.pt", lambda: examples(policy, *train))
    if args.subset:
        exs = exs[: args.subset]
    print(f"{len(exs)} rollouts, {sum(len(e.tokens) - e.start for e in exs)} response tokens", flush=True)
    if args.extra_text:
        extra = cached(f"{args.cache}/extra_{args.extra_text}.pt", lambda: examples(policy, *stdlib_chunks(tok, args.extra_text)))
        print(f"and {len(extra)} chunks of the standard library, {sum(len(e.tokens) - e.start for e in extra)} tokens", flush=True)
        exs = exs + extra
    vocab = frequent_tokens(exs, 8192, always=tuple(policy.config.eos_token_ids) + tuple(tok.all_special_ids))
    results = {}
    for name in args.variants:
        frozen = name.startswith("frozen")
        noise = float(name[len("frozen"):]) if frozen and name != "frozen" else 0.0
        objective = name if name in ("tv", "kl+tv") else "kl"
        config = EagleConfig(lr=1e-3, seconds=args.seconds, max_steps=100_000, batch_sequences=16, seed=0, feature_noise=noise,
                             objective=objective)
        distiller = VariantDistiller(new_head(policy, vocab, seed=0), policy, config, fused=name == "fused", frozen_readout=frozen)
        start = time.perf_counter()
        losses = distiller.fit(exs)
        results[name] = {"source": args.source + ("" if args.source == "rl-style" else f" at temperature {args.instruct_temperature:g}"), "rollouts": len(exs) - args.extra_text, "extra_text_chunks": args.extra_text, "steps": len(losses), "train_s": round(time.perf_counter() - start, 1),
                         "heldout_acceptance": distiller.expected_acceptance(*held),
                         "same_prompts_acceptance": distiller.expected_acceptance(*held_same),
                         "train_acceptance": distiller.expected_acceptance(train[0][:24], train[1][:24])}
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
