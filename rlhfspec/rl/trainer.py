"""The RLHF loop: generation -> inference -> training -> weight sync (+ drafter refresh), checkpointed."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from rlhfspec.allocator import keep_freed_memory
from rlhfspec.data.chat import encode_prompt
from rlhfspec.data.sources import make_source
from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.loader import load_model
from rlhfspec.models.rounding import engine_copy
from rlhfspec.rewards.compose import RewardSet
from rlhfspec.rl import checkpoint as ckpt
from rlhfspec.rl.config import Config
from rlhfspec.engine.spec import DraftModel, Eagle
from rlhfspec.rl.drafting import DraftRefresher
from rlhfspec.rl.distributed import RayLearners
from rlhfspec.rl.experience import make_targets
from rlhfspec.rl.learner import Learner, compute_context, load_critic, score_params, steps_per_epoch
from rlhfspec.rl.logprobs import Batch
from rlhfspec.rl.metrics import MetricsLog
from rlhfspec.rollout import Placement, Rollout

SUCCESS_REWARDS = ("arithmetic_correct", "gsm8k_correct")


class Trainer:
    """The RL loop over a Config. `reward_funcs` (one or a list of callables with TRL's signature,
    built-in names or 'module:function') and `train_dataset` (a `datasets.Dataset`, a list of row dicts, or a path)
    take the place of reward.functions and data.task when given."""

    def __init__(self, config: Config, resume: bool = False, log=print, progress: bool = True, *,
                 reward_funcs=None, train_dataset=None):
        self.config, self.log, self.progress = config, log, progress
        c = config
        c.validate()
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        if c.run.keep_freed_memory:
            keep_freed_memory()
        self.run_dir = Path(c.run.output_dir)
        if resume:
            ckpt.check_loadable(self.run_dir)
        elif ckpt.latest(self.run_dir) is not None:
            raise RlhfspecError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose another run.output_dir.")
        self.seed = c.train.seed
        random.seed(self.seed)
        torch.manual_seed(self.seed)
        self.params = SamplingParams(temperature=c.generation.temperature, top_p=c.generation.top_p, top_k=c.generation.top_k,
                                     max_new_tokens=c.generation.max_new_tokens)
        self.score_params = score_params(c)
        self.filtered = c.generation.top_p < 1.0 or c.generation.top_k > 0
        # Cheap things first, so a bad reward or dataset fails before any model loads.
        functions = reward_funcs if reward_funcs is not None else c.reward.functions
        functions = list(functions) if isinstance(functions, (list, tuple)) else [functions]  # one function, as TRL takes it too
        self.rewards = RewardSet(functions, None if c.reward.reward_model else c.reward.weights)
        self.source = prompt_source(c, train_dataset)
        self.device = device = c.device()
        self.policy, self.tokenizer = load_model(c.model.policy, dtype=c.model.dtype, device=device)
        if self.tokenizer is None:
            raise RlhfspecError(f"{c.model.policy} has no tokenizer; RL needs one to encode prompts and decode completions.")
        self.policy.train().requires_grad_(True)
        self.compute_dtype = c.train.compute_dtype(str(self.policy.device))
        weights = str(self.policy.dtype).removeprefix("torch.")
        log(f"training on {device} in {self.compute_dtype}" + (f" (autocast over {weights} weights)" if self.compute_dtype == "bfloat16" else ""))
        # The engine runs the trainer's own parameters when it generates in the trainer's precision
        # (its packed weights are rebuilt whenever the optimizer changes them); otherwise it holds a copy.
        self.gen_dtype = gen_dtype = c.generation_dtype(str(self.policy.device))
        self.shared = gen_dtype in (c.model.dtype, str(self.policy.dtype).removeprefix("torch."))
        # On Ray the actors hold the engine's copies; this process keeps none.
        ray = c.generation.backend == "ray"
        self.engine = self.policy if self.shared or ray else load_model(c.model.policy, dtype=gen_dtype, device=device, tokenizer=False)[0]
        self.owns_ray = _connect_ray(c) if ray or c.train.workers > 1 else False
        needs_ref = c.algorithm.beta > 0
        self.reference = load_model(c.model.reference or c.model.policy, dtype=c.model.dtype, device=device, tokenizer=False)[0] if needs_ref else None
        self.critic = load_critic(c, device) if c.algorithm.name == "ppo" else None
        if c.reward.reward_model:
            self.rewards = RewardSet(self.rewards.functions + [_reward_model(c, device)], c.reward.weights)
        # The learner trains this process's policy and critic, or (train.workers > 1) trains its
        # own copies on Ray workers and copies rank 0's weights into these after every iteration.
        self.learner = RayLearners(c, self.policy, self.critic) if c.train.workers > 1 else Learner(c, self.policy, self.critic)
        engine_device = c.engine_device()
        spec = c.generation.engine_spec(engine_device)
        placement = Placement(c.generation.instances, c.generation.backend, realloc=c.generation.realloc, ray_address=c.run.ray_address,
                              gpus_per_instance=c.generation.actor_gpus(device))
        self.rollout = Rollout(self.engine, self.tokenizer, spec, placement, model=str(c.model.policy), dtype=gen_dtype,
                               threads=_actor_threads(c), device=engine_device)
        for d in spec.drafters:
            log(f"drafting with {d.name}" + (f" ({d.path})" if isinstance(d, (DraftModel, Eagle)) else ""))
        g = c.generation
        self.refresher = DraftRefresher(self.rollout.drafters, g.refresh_seconds, g.refresh_drop, targets=g.refresh_targets,
                                        buffer=g.refresh_buffer, unroll=g.refresh_unroll,
                                        trace_every=g.refresh_trace_every) if g.refresh_draft else None
        self.iteration = 0
        self.verified_logprobs: bool | None = None
        # One optimizer step per iteration and no reference model: the policy the step trains is
        # the one that sampled, so the training forward's own logprobs are the old ones (as TRL's
        # with one iteration per generation) and it measures the engine's gap on the way: no
        # inference-stage forward.
        self.old_in_training = c.train.epochs * steps_per_epoch(c) == 1 and self.reference is None
        if resume:
            self._resume()
            # Ray actors start from the checkpoint's weights
            self.rollout.sync(getattr(torch, gen_dtype), c.generation.rounding, (c.train.seed, self.iteration))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(c.to_dict(), sort_keys=False))
        self.metrics = MetricsLog(self.run_dir, c.run.tensorboard, c.run.wandb, c.to_dict())
        self.metrics.truncate(self.iteration)

    # ---- the loop -------------------------------------------------------------------------
    def train(self) -> list[dict]:
        """Every remaining iteration; their records."""
        return list(self.iterate())

    def iterate(self) -> Iterator[dict]:
        """The remaining iterations one at a time, each record yielded once it is logged and any
        checkpoint due is written, so that a caller can do other work between iterations (bench trl
        interleaves TRL's); the run closes when the last is taken, or when the iterator is closed."""
        try:
            while self.iteration < self.config.train.iterations:
                record = self.step()
                self.metrics.write(record)
                self.log(_summary(record))
                self.iteration += 1
                last = self.iteration == self.config.train.iterations
                if self.iteration % self.config.run.checkpoint_every == 0 or last:
                    self.save()
                yield record
        finally:
            self.metrics.close()
            self.close()

    def close(self) -> None:
        """Stop the Ray actors and training workers this run started (and the Ray connection, when the run made it)."""
        self.rollout.shutdown()
        self.learner.close()
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False

    def step(self) -> dict:
        """One iteration; nothing is committed (optimizer step, checkpoint) unless it all succeeds."""
        c, it = self.config, self.iteration
        g = c.generation.num_generations
        t0 = time.perf_counter()
        rows = self.source.next(c.data.prompts_per_iteration)
        prompt_ids = [encode_prompt(self.tokenizer, r["prompt"]) for r in rows]
        prompts = [p for p in prompt_ids for _ in range(g)]
        ids = [(it * len(rows) + i) * g + j for i in range(len(rows)) for j in range(g)]
        rollout = self.rollout.run(prompts, self.params, self.seed, ids, progress=self.progress)
        t1 = time.perf_counter()
        outs = rollout.outputs
        texts = [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        row_prompts = [r["prompt"] for r in rows for _ in range(g)]
        # As TRL does: a conversational prompt (chat messages) gets its completion as messages too.
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(row_prompts, texts)]
        columns = {k: [r.get(k) for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
        table, totals = self.rewards.score(row_prompts, completions, [o.token_ids for o in outs], columns)
        batch = Batch(prompts, [o.token_ids or [self.tokenizer.eos_token_id or 0] for o in outs], self.config.train.share_prompts)
        logprobs = [o.logprobs or [0.0] for o in outs]
        self.logprob_gap: dict = {}
        self.checked_logprobs = None  # the trainer's logprobs of this batch, if the check computed them
        if it % c.train.logprob_check_every == 0:
            self.verified_logprobs = None  # checked again every so often: the policy moves
        with self._compute():
            reuse = self._reuse_rollout_logprobs(batch, logprobs)
            inference = make_targets(batch, totals, g, logprobs, c.algorithm, self.score_params, self.policy, reuse,
                                     self.reference, self.critic, c.train.micro_batch_tokens, rollout_comparable=not self.filtered,
                                     trainer_logprobs=self.checked_logprobs, in_training=self.old_in_training)
        t2 = time.perf_counter()
        train_stats = self.learner.optimize(batch, inference.targets, it)
        if self.old_in_training and self.verified_logprobs is None and "rollout_trainer_logprob_gap_max" in train_stats:
            self._verified(train_stats["rollout_trainer_logprob_gap_max"], train_stats["rollout_trainer_logprob_gap_mean"], reuse)
        if not self.shared:
            self._sync_engine(it + 1)
        t3 = time.perf_counter()
        refresh = {}
        acceptance, chains = rollout.acceptance_by_drafter(), rollout.chain_length_by_drafter()
        if self.refresher is not None:
            g = c.generation
            budget = None if g.refresh_budget is None else min(g.refresh_seconds, g.refresh_budget * (t3 - t0))
            refresh = self.refresher.refresh(self.policy, batch, acceptance, seconds=budget, outputs=outs, chains=chains)
        # Ray actors: new weights before the next rollout
        sync = self.rollout.sync(getattr(torch, self.gen_dtype), c.generation.rounding, (c.train.seed, it + 1))
        success = self._success(table)
        self.source.observe(success if success is not None else 0.0)
        t4 = time.perf_counter()
        record = {
            "iteration": it,
            "reward": totals.mean().item(), "reward_std": totals.std().item() if len(totals) > 1 else 0.0,
            **{f"reward/{n}": _nanmean(table[:, j]) for j, n in enumerate(self.rewards.names)},
            "success": success, "completion_len": sum(len(o.token_ids) for o in outs) / len(outs),
            "completion_len_max": max(len(o.token_ids) for o in outs),
            **inference.stats, **self.logprob_gap, **train_stats, **refresh, **sync,
            "generation_s": t1 - t0, "inference_s": t2 - t1, "training_s": t3 - t2, "sync_s": t4 - t3, "iteration_s": t4 - t0,
            "gen_tokens": rollout.tokens, "gen_tok_s": rollout.tokens / max(rollout.seconds, 1e-9),
            "acceptance": rollout.acceptance, **{f"acceptance/{k}": v for k, v in acceptance.items()},
            **{f"chain/{k}": v for k, v in chains.items()},  # mean tokens drafted per sample a step
        }
        if hasattr(self.source, "digits"):
            record["digits"] = self.source.digits
        return record

    def _compute(self):
        """The inference stage's forwards, in the trainer's compute precision."""
        return compute_context(self.compute_dtype, self.policy.device)

    def _reuse_rollout_logprobs(self, batch: Batch, logprobs: list[list[float]]) -> bool:
        """Whether the engine's logprobs serve as the old logprobs (algorithm.old_logprobs): "auto"
        reuses them when they equal the trainer's within 1e-3 at the last check. The gap is measured
        and logged at every check whatever the mode; the trainer's logprobs the check computes are
        the recomputed old ones, so it costs an extra forward only in the "rollout" mode. With the
        old logprobs taken in training (`old_in_training`) the training forward measures the gap
        every iteration and no forward runs here."""
        if self.old_in_training or self.verified_logprobs is not None:  # in training: measured there (_verified)
            return self._reuses(self.verified_logprobs)
        from rlhfspec.rl.experience import padded
        from rlhfspec.rl.logprobs import all_logprobs

        trainer = self.checked_logprobs = all_logprobs(self.policy, batch, self.score_params, self.config.train.micro_batch_tokens)
        mask = batch.mask()
        gap = (trainer - padded(logprobs, mask.shape[1])).abs() * mask
        diff, mean = gap.max().item(), (gap.sum() / mask.sum()).item()
        self.logprob_gap = {"rollout_trainer_logprob_gap_max": diff, "rollout_trainer_logprob_gap_mean": mean}
        reuse = self._reuses(diff < 1e-3)
        self._verified(diff, mean, reuse)
        return reuse

    def _reuses(self, verified: bool | None) -> bool:
        """algorithm.old_logprobs' choice given the last check: "rollout" always takes the engine's,
        "auto" when the engine is the trainer's own weights, unfiltered, and checked equal."""
        mode = self.config.algorithm.old_logprobs
        return mode == "rollout" or (mode == "auto" and self.shared and not self.filtered and bool(verified))

    def _verified(self, diff: float, mean: float, reuse: bool) -> None:
        """Record (and log) a rollout/trainer logprob check: whether "auto" may reuse the engine's."""
        mode = self.config.algorithm.old_logprobs
        self.verified_logprobs = diff < 1e-3
        if mode == "rollout":
            use = "the engine's are the behaviour policy's"
        elif reuse:
            use = "reusing the engine's"
        else:
            use = "the training forward's own" if self.old_in_training else "recomputing with the trainer"
        self.log(f"engine vs trainer logprobs: max difference {diff:.2e}, mean {mean:.2e}; {use} (algorithm.old_logprobs {mode})")

    def _sync_engine(self, iteration: int) -> None:
        """Copy the trainer's weights into the engine's (lower-precision) copy that generates
        `iteration`'s rollout."""
        rounding, key = self.config.generation.rounding, (self.config.train.seed, iteration)
        with torch.no_grad():
            for (name, dst), src in zip(self.engine.named_parameters(), self.policy.parameters()):
                dst.copy_(engine_copy(name, src, dst.dtype, rounding, key))

    def _success(self, table: torch.Tensor) -> float | None:
        for j, name in enumerate(self.rewards.names):
            if name in SUCCESS_REWARDS:
                return _nanmean(table[:, j])
        return None

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self) -> Path:
        tensors, learner = self.learner.state_dict()
        objects = {
            "iteration": self.iteration, **learner,
            "rng": ckpt.rng_state(), "source": self.source.state_dict(), "verified_logprobs": self.verified_logprobs,
            "rollout": self.rollout.state_dict(), "refresh": self.refresher.state_dict() if self.refresher is not None else {},
        }
        path = ckpt.save(self.run_dir, self.iteration, tensors, objects, keep=self.config.run.keep_checkpoints)
        self.log(f"checkpoint {path}")
        return path

    def _resume(self) -> None:
        path = ckpt.latest(self.run_dir)
        if path is None:
            raise RlhfspecError(f"--resume: {self.run_dir} has no checkpoint to resume from.")
        tensors, objects = ckpt.load(path)
        self.learner.load_state_dict(tensors, objects)
        ckpt.set_rng_state(objects["rng"])
        self.source.load_state_dict(objects["source"])
        # The last check's verdict, as the uninterrupted run holds it: checking again here would take
        # the old logprobs from another forward than the uninterrupted run's, which differ in the
        # last bits wherever the engine's and the trainer's kernels round apart (an AVX2 EPYC did).
        self.verified_logprobs = objects.get("verified_logprobs")
        if "rollout" not in objects:
            raise RlhfspecError(f"checkpoint {path} was written by an older rlhfspec, before the generation state was kept per "
                                "instance; resume it with that version, or start a new run.")
        self.rollout.load_state_dict(objects["rollout"])
        if self.refresher is not None:
            self.refresher.load_state_dict(objects["refresh"])
        self.iteration = objects["iteration"]
        if not self.shared:
            self._sync_engine(self.iteration)
        self.log(f"resumed from {path} at iteration {self.iteration}")


def _actor_threads(c: Config) -> int:
    """Threads of each Ray generation actor: run.threads (or this process's) shared among them."""
    return max(1, (c.run.threads or torch.get_num_threads()) // c.generation.instances)


def _connect_ray(c: Config) -> bool:
    """Join run.ray_address, or start a local cluster with a CPU for every thread of the generation
    actors and one for each training worker (Ray's CPUs are what actors reserve, not cores)."""
    from rlhfspec.rollout.ray_backend import connect

    actors = _actor_threads(c) * c.generation.instances if c.generation.backend == "ray" else 0
    return connect(c.run.ray_address, num_cpus=actors + (c.train.workers if c.train.workers > 1 else 0))


def prompt_source(c: Config, train_dataset=None):
    """The prompt source a run of `c` draws its rows from (train_dataset, when given, in place of data.task)."""
    arith = c.data.task == "arithmetic" and train_dataset is None
    return make_source(train_dataset if train_dataset is not None else c.data.task, c.data.prompt_column, c.train.seed, c.data.shuffle,
                       **({"digits": c.data.digits, "terms": c.data.terms, "ops": c.data.ops, "curriculum": c.data.curriculum} if arith else {}))


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[~torch.isnan(x)]
    return x.mean().item() if len(x) else None


def _reward_model(c: Config, device: str):
    from rlhfspec.rewards.reward_model import RewardModel

    return RewardModel(c.reward.reward_model, device=device)


def _summary(r: dict) -> str:
    acc = "" if r.get("acceptance") is None else f", acceptance {r['acceptance']:.0%}"
    succ = "" if r.get("success") is None else f", success {r['success']:.0%}"
    return (f"iteration {r['iteration']}: reward {r['reward']:.3f}{succ}, length {r['completion_len']:.0f}, "
            f"{r['iteration_s']:.1f} s (generation {r['generation_s']:.1f} s at {r['gen_tok_s']:.0f} tok/s{acc}, "
            f"training {r['training_s']:.1f} s)")
