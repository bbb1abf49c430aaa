"""The training stage: the policy being trained, its optimizer and schedule, the PPO critic, and the
optimizer steps over one iteration's experience, in this process or as one rank of several."""

from __future__ import annotations

import contextlib
import math
import random
import time

import torch

from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.loader import load_model
from rlhfspec.rl.config import Config
from rlhfspec.rl.logprobs import Batch, completion_logprobs, values_at
from rlhfspec.rl.objective import Targets, policy_objective, value_objective
from rlhfspec.rl.zero import Shards, clip, global_norm, global_state, local_state, pack_gradients, unpack_gradients

# What a mini-batch's ranks add up besides gradients, in the order optimize keeps them.
COUNTS = ("clipped", "tokens", "kl_sum", "entropy_sum", "entropy_tokens", "gap_sum", "gap_tokens", "forward_tokens")


def load_critic(c: Config, device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Parameter]:
    """The PPO critic on `device`: model.critic (or the policy) with a zero value head, both trainable."""
    model = load_model(c.model.critic or c.model.policy, dtype=c.model.dtype, device=device, tokenizer=False)[0].train().requires_grad_(True)
    return model, torch.nn.Parameter(torch.zeros(model.config.hidden_size, 1, device=model.device))


def compute_context(compute_dtype: str, device: torch.device):
    """The trainer's forwards: under bfloat16 autocast over the float32 weights, or plain."""
    if compute_dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def weight_tensors(policy, critic) -> dict:
    """The checkpoint's tensors: the policy's state dict and the critic's with its value head."""
    tensors = {"policy": policy.state_dict()}
    if critic is not None:
        tensors["critic"] = {**critic[0].state_dict(), "value_head": critic[1].detach()}
    return tensors


def load_weights(policy, critic, tensors: dict) -> None:
    """Copy `weight_tensors`' output into the policy (and the critic) in place."""
    with torch.no_grad():
        policy.load_state_dict(tensors["policy"], strict=True)
        if critic is not None:
            critic[0].load_state_dict({k: v for k, v in tensors["critic"].items() if k != "value_head"}, strict=True)
            critic[1].copy_(tensors["critic"]["value_head"])


def skips_zero_advantage(c: Config, critic: bool) -> bool:
    """Whether the learner runs no forward for samples with zero advantage (train.skip_zero_advantage):
    when nothing but the advantage-weighted surrogate reads them, that is with no critic, no
    entropy bonus and no KL term in the loss (kl_in_reward null counts as in the loss)."""
    a = c.algorithm
    return c.train.skip_zero_advantage and not critic and not a.entropy_coef and not (a.beta > 0 and not a.kl_in_reward)


def steps_per_epoch(c: Config) -> int:
    """Optimizer steps per epoch: mini_batches, or fewer when an iteration has fewer samples."""
    return min(c.train.mini_batches, c.data.prompts_per_iteration * c.generation.num_generations)


class Learner:
    """The policy's AdamW optimizer and LR schedule (and the critic's optimizer under PPO) and the
    loop of optimizer steps. As rank `rank` of `world` (torch.distributed already joined) it takes
    its share of each mini-batch's micro-batches (`_share`) and sums the gradients over the ranks:
    with train.shard_optimizer each rank keeps and steps the optimizer state of its share of the
    parameters only (`zero.Shards`), otherwise every rank steps all of them alike (replicated
    state); world 1 is the in-process trainer."""

    def __init__(self, config: Config, policy, critic=None, rank: int = 0, world: int = 1):
        c = self.config = config
        self.policy, self.critic, self.rank, self.world = policy, critic, rank, world
        self._checkpointing()
        self.compute_dtype = c.train.compute_dtype(str(policy.device))
        self.skips_flat = skips_zero_advantage(c, critic=critic is not None)
        self.score_params = score_params(c)
        self.sharded = world > 1 and c.train.shard_optimizer
        self.shards = Shards(self._groups(), rank, world) if self.sharded else None
        stepped = self.shards.owned if self.sharded else lambda group: self._groups()[group]
        self.optimizer = torch.optim.AdamW(stepped(0), lr=c.train.learning_rate, betas=c.train.adam_betas, weight_decay=c.train.weight_decay)
        total = c.train.iterations * c.train.epochs * steps_per_epoch(c)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(c.train.lr_schedule, c.train.warmup_steps, total))
        self.critic_opt = None
        if critic is not None:
            self.critic_opt = torch.optim.AdamW(stepped(1), lr=c.train.critic_learning_rate,
                                                betas=c.train.adam_betas, weight_decay=c.train.weight_decay)

    def _groups(self) -> list[list[torch.nn.Parameter]]:
        """The parameters of each optimizer: the policy's, then (under PPO) the critic's and its value head."""
        critic = [[*self.critic[0].parameters(), self.critic[1]]] if self.critic is not None else []
        return [list(self.policy.parameters()), *critic]

    def _checkpointing(self) -> None:
        """The models recompute their layers in the backward pass as train.gradient_checkpointing says."""
        for model in (self.policy, *(self.critic or ())[:1]):
            model.checkpointing = self.config.train.gradient_checkpointing

    def compute(self):
        """The training forwards' context: bfloat16 autocast or plain."""
        return compute_context(self.compute_dtype, self.policy.device)

    def optimize(self, batch: Batch, targets: Targets, iteration: int) -> dict:
        """train.epochs passes of train.mini_batches optimizer steps over the iteration's samples, in
        the order random.Random(seed * 7919 + iteration) shuffles them; the steps' statistics."""
        c = self.config
        self._checkpointing()
        targets = targets.to(self.policy.device)  # the inference stage leaves them on the CPU
        order = list(range(len(batch)))
        rng = random.Random(c.train.seed * 7919 + iteration)
        losses, grad_norms, lr = [], [], None
        counts = dict.fromkeys(COUNTS, 0.0)
        counts["gap_max"] = 0.0
        self.reduce_s = 0.0
        skipped = 0
        for epoch in range(c.train.epochs):
            rng.shuffle(order)
            # Mini-batches of near-equal size (they differ by at most one sample), so no step runs
            # on a small remainder at full weight, and the schedule counts exactly these steps.
            for mb in (m.tolist() for m in torch.tensor_split(torch.tensor(order), min(c.train.mini_batches, len(order)))):
                self.optimizer.zero_grad(set_to_none=True)
                trained = self._trained(targets, mb)
                skipped += (len(mb) - len(trained)) * (epoch == 0)
                total = self._backward(batch, targets, mb, trained, counts, epoch == 0)
                total = self._all_reduce(total)
                if not trained:
                    for p in self.optimizer.param_groups[0]["params"]:  # every sample skipped: the zero gradient their forwards give
                        p.grad = torch.zeros_like(p)
                if not math.isfinite(total):
                    raise RlhfspecError(f"the policy loss became {total} at iteration {iteration}; the iteration was not committed (try a lower learning rate).")
                norm = self._clip(0)
                if not torch.isfinite(norm):
                    raise RlhfspecError(f"the gradient norm became {norm.item()} at iteration {iteration}; the iteration was not committed.")
                lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
                self.optimizer.step()
                self.scheduler.step()
                if self.critic is not None:
                    self._clip(1)
                    self.critic_opt.step()
                    self.critic_opt.zero_grad(set_to_none=True)
                if self.sharded:  # every rank's updated share into every rank's weights
                    start = time.perf_counter()
                    self.shards.share_weights()
                    self.reduce_s += time.perf_counter() - start
                losses.append(total)
                grad_norms.append(norm.item())
        counts = self._sum_counts(counts)
        out = {"loss": sum(losses) / len(losses), "grad_norm": sum(grad_norms) / len(grad_norms),
               "clip_frac": counts["clipped"] / max(counts["tokens"], 1), "lr": lr,
               "train_tokens": counts["forward_tokens"],  # the tokens the training forwards ran, padding included
               "skipped_samples": skipped,  # samples with no advantage, no forward (train.skip_zero_advantage)
               "optimizer_state_mb": self._state_mb()}  # the AdamW moments this rank keeps
        if counts["entropy_tokens"]:  # over the trained samples' tokens (none when every sample was skipped)
            out["entropy"] = counts["entropy_sum"] / counts["entropy_tokens"]
        if c.algorithm.beta > 0 and not c.algorithm.kl_in_reward:
            out["kl_loss_term"] = counts["kl_sum"] / max(counts["tokens"], 1)
        if self.world > 1:  # this rank's seconds summing gradients (and, sharded, gathering weights), waiting for slower ranks included
            out["allreduce_s"] = self.reduce_s
        if counts["gap_tokens"]:  # the engine's logprobs against this forward's (Targets.rollout_logprobs)
            out["rollout_trainer_logprob_gap_max"] = counts["gap_max"]
            out["rollout_trainer_logprob_gap_mean"] = counts["gap_sum"] / counts["gap_tokens"]
            if targets.old_logprobs is None:
                out["rollout_trainer_logprob_diff"] = counts["gap_max"]
        return out

    def _trained(self, targets: Targets, mb: list[int]) -> list[int]:
        """The samples of mini-batch `mb` the step runs forwards for: all of them, or with
        `skips_flat` those with an advantage other than zero. A sample whose every advantage is
        zero (its group all scored alike) adds exactly nothing to the loss or its gradient then, so
        skipping it changes no update; the mini-batch's normalisation still counts its tokens."""
        if not self.skips_flat:
            return mb
        adv = targets.advantages[mb]
        live = adv != 0 if adv.dim() == 1 else (adv != 0).any(-1)
        return [i for i, keep in zip(mb, live.tolist()) if keep]

    def _backward(self, batch: Batch, targets: Targets, mb: list[int], trained: list[int], counts: dict, first_epoch: bool) -> float:
        """Accumulate this rank's share of mini-batch `mb`'s gradients, running forwards over its
        samples `trained` only; its share of the loss, or the first non-finite micro-batch loss
        (nothing of which is backpropagated)."""
        # The whole mini-batch's token and sequence counts normalise every share, so the ranks'
        # gradients add up to the mini-batch's.
        n_tokens, n_seqs = targets.mask[mb].sum().item(), len(mb)
        sub = batch.subset(trained)
        total = 0.0
        with self.compute():  # one autocast region per step: each weight is cast once for all micro-batches
            for micro in self._share(sub):
                total += self._micro_backward(sub, trained, micro, targets, n_tokens, n_seqs, counts, first_epoch)
                if not math.isfinite(total):
                    return total
        return total

    def _share(self, sub: Batch) -> list[list[int]]:
        """This rank's micro-batches of `sub` (Batch.rank_shares: the ranks' forward tokens evened, so
        that none waits long for the others in the gradient sum)."""
        return sub.rank_shares(self.config.train.micro_batch_tokens, self.world)[self.rank]

    def _micro_backward(self, sub: Batch, rows: list[int], micro: list[int], targets: Targets, n_tokens: float,
                        n_seqs: int, counts: dict, first_epoch: bool) -> float:
        """One micro-batch's forward and backward (rows `micro` of `sub`, samples `rows` of the
        iteration); its loss (not backpropagated if not finite)."""
        c, algo = self.config, self.config.algorithm
        idx = [rows[i] for i in micro]
        lp, _, ent = completion_logprobs(self.policy, sub, micro, self.score_params, entropy=True, entropy_grad=bool(algo.entropy_coef),
                                         logits_chunk=c.train.logits_chunk)
        with self.plain():
            loss, st = policy_objective(lp, idx, targets, algo, n_tokens, n_seqs, c.generation.max_new_tokens, ent)
            if not torch.isfinite(loss):
                return loss.item()
            if first_epoch:  # the policy's entropy on its own rollout tokens, and its gap to the engine's logprobs
                counts["entropy_sum"] += st["entropy_sum"]
                counts["entropy_tokens"] += st["tokens"]
                if "gap_max" in st:
                    counts["gap_max"] = max(counts["gap_max"], st["gap_max"])
                    counts["gap_sum"] += st["gap_sum"]
                    counts["gap_tokens"] += st["tokens"]
            loss.backward()
        counts["clipped"] += st["clipped"]
        counts["tokens"] += st["tokens"]
        counts["forward_tokens"] += sub.forward_tokens(micro)
        counts["kl_sum"] += st.get("kl_sum", 0.0)
        if self.critic is not None:
            model, head = self.critic
            v = values_at(model, head, sub, micro)
            with self.plain():
                value_objective(v, idx, targets, algo, n_tokens).mul(algo.value_coef).backward()
        return loss.item()

    def _clip(self, group: int) -> torch.Tensor:
        """Clip group `group`'s gradients (0: the policy's, 1: the critic's) to train.max_grad_norm
        of their norm over the whole model; that norm."""
        params, limit = self._groups()[group], self.config.train.max_grad_norm
        if self.world == 1:
            return torch.nn.utils.clip_grad_norm_(params, limit)
        total = global_norm(params, self.shards.places(group) if self.sharded else None)
        clip(params, limit, total)
        return total

    def _state_mb(self) -> float:
        """The optimizer states' tensors this rank holds, MB."""
        opts = [self.optimizer, *([self.critic_opt] if self.critic_opt is not None else [])]
        return sum(t.numel() * t.element_size() for o in opts for s in o.state.values() for t in s.values() if torch.is_tensor(t)) / 2**20

    def plain(self):
        """Leaves the compute context for the loss and the backward pass (as autocast asks), keeping
        its cast weights for the step's next micro-batch (an inner autocast region keeps the cache)."""
        return torch.autocast(self.policy.device.type, enabled=False)

    def _all_reduce(self, total: float) -> float:
        """Sum the ranks' gradients (policy and critic) and their shares of the loss, in one
        float32 all-reduce (sharded: each rank's own parameters' sums by a reduce-scatter, the
        loss by an all-reduce); a parameter no rank has a gradient for keeps none (AdamW skips it)."""
        if self.world == 1:
            return total
        import torch.distributed as dist

        start = time.perf_counter()
        if self.sharded:
            self.shards.reduce_scatter()
            loss = torch.tensor([total], device=self.policy.device)
            dist.all_reduce(loss)
            self.reduce_s += time.perf_counter() - start
            return loss.item()
        params = self.trained_parameters()
        flat = torch.empty(sum(p.numel() for p in params) + len(params) + 1, device=params[0].device)
        flat[pack_gradients(flat, 0, params)] = total  # each gradient dropped once copied: no buffer beside them
        dist.all_reduce(flat)
        total = flat[unpack_gradients(flat, 0, params)].item()
        self.reduce_s += time.perf_counter() - start
        return total

    def _sum_counts(self, counts: dict) -> dict:
        """The statistics' sums over all ranks (float64, as the Python floats they are)."""
        if self.world == 1:
            return counts
        import torch.distributed as dist

        flat = torch.tensor([counts[k] for k in COUNTS], dtype=torch.float64, device=self.policy.device)
        dist.all_reduce(flat)
        top = torch.tensor([counts["gap_max"]], dtype=torch.float64, device=self.policy.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return {**dict(zip(COUNTS, flat.tolist())), "gap_max": top.item()}

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The policy's parameters, then the critic's and its value head."""
        return [p for group in self._groups() for p in group]

    def state_dict(self) -> tuple[dict, dict]:
        """The checkpoint's part this learner owns: (tensors: policy and critic weights, objects:
        optimizer, scheduler and critic optimizer states; sharded, this rank's share numbered by the
        parameters' places in their models, for `zero.merge_states`)."""
        objects = {"optimizer": self._global(0, self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict()}
        if self.critic is not None:
            objects["critic_optimizer"] = self._global(1, self.critic_opt.state_dict())
        return weight_tensors(self.policy, self.critic), objects

    def load_state_dict(self, tensors: dict, objects: dict) -> None:
        """Weights and states as `state_dict` gives them, its optimizer states whole (any number of
        ranks, sharded or not, wrote them)."""
        load_weights(self.policy, self.critic, tensors)
        self.optimizer.load_state_dict(self._local(0, objects["optimizer"]))
        self.scheduler.load_state_dict(objects["scheduler"])
        if self.critic is not None:
            self.critic_opt.load_state_dict(self._local(1, objects["critic_optimizer"]))

    def _global(self, group: int, state: dict) -> dict:
        return global_state(state, self.shards.places(group)) if self.sharded else state

    def _local(self, group: int, state: dict) -> dict:
        return local_state(state, self.shards.places(group), len(self._groups()[group])) if self.sharded else state

    def close(self) -> None:
        """Nothing to release: the in-process learner is this process's own tensors (RayLearners
        stops its workers here)."""


def score_params(c: Config) -> SamplingParams:
    """What the trainer scores tokens under: the temperature alone (top-k / top-p shape what is
    sampled, not what is trained, as in TRL and verl), so no sampled token has logprob -inf."""
    return SamplingParams(temperature=c.generation.temperature, max_new_tokens=c.generation.max_new_tokens)


def _schedule(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            # (step + 1) / warmup, not transformers' step / warmup: its first step, at rate 0,
            # would spend the first iteration's samples on nothing.
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        raise RlhfspecError(f"train.lr_schedule {kind!r} is not constant, linear or cosine.")

    f(0)
    return f
