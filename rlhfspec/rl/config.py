"""Run configuration: typed dataclasses with their defaults and checks (read from YAML and
`--section.key value` overrides by rlhfspec.rl.config_files)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfspec.distill.teacher import TOP_K
from rlhfspec.engine.spec import STRATEGIES, DraftModel, Eagle, EngineSpec, check_drafter, drafter_spec, strategy_spec
from rlhfspec.errors import RlhfspecError
from rlhfspec.models import hardware
from rlhfspec.models.rounding import ROUNDINGS
from rlhfspec.rl.losses import AGGREGATIONS
from rlhfspec.rl.typed import coerce_fields
from rlhfspec.rollout.generate import BACKENDS


@dataclass(slots=True)
class ModelsConfig:
    """The `model` section: which checkpoints play policy, reference and critic (an architecture
    is models.config.ModelConfig)."""

    policy: str = "default"  # "default", a Hugging Face directory or a .gguf file
    reference: str | None = None  # None: a frozen copy of the initial policy (loaded only when a KL term needs it)
    critic: str | None = None  # PPO: None initialises the critic from the policy
    dtype: str = "float32"  # the weights' precision (master weights; train.dtype is the compute precision)


@dataclass(slots=True)
class DataConfig:
    task: str = "arithmetic"  # "arithmetic" (built in) or a path: .jsonl, .parquet or a datasets directory
    prompt_column: str = "prompt"  # or "messages" rows (chat turns)
    prompts_per_iteration: int = 8
    shuffle: bool = True
    # built-in arithmetic task
    digits: int = 1
    terms: int = 2
    ops: str = "+-"
    curriculum: bool = False  # adapt the number of digits to the running success rate


@dataclass(slots=True)
class RewardConfig:
    functions: list[str] = field(default_factory=lambda: ["arithmetic_correct", "answer_format"])
    weights: list[float] | None = None  # one per function; None: all 1.0
    reward_model: str | None = None  # an HF sequence-classification checkpoint, added as one more reward


@dataclass(slots=True)
class GenerationConfig:
    num_generations: int = 8  # G samples per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64  # live samples per instance
    # The engine's precision. null: the weights' (model.dtype), so the engine runs the trainer's own
    # parameters. "bfloat16" with float32 weights generates from a bf16 copy synced after every step:
    # about 1.5x the tokens/s on a CPU with native bf16; not the default (benchmarks/RESULTS.md, the
    # default-run section, has its seeds against float32's).
    dtype: str | None = None
    # How a bf16 engine copy rounds the float32 weights after each step: "nearest", or "stochastic"
    # (unbiased: the engine's policy follows small updates that nearest partly drops, see
    # rlhfspec/models/rounding.py; about 2 s a sync on this CPU, and no reward difference measured on the
    # default run over five seeds, so not the default).
    rounding: str = "nearest"
    speculative: bool = True  # speculative decoding
    strategy: str = "adaptive"  # "adaptive", "static" or "threshold" (static while the live batch <= threshold_batch)
    drafters: list[str] = field(default_factory=lambda: ["ngram"])  # "ngram", "draft" (distilled), "eagle", or draft/head paths
    num_draft_tokens: int = 4  # for strategies "static" and "threshold"
    threshold_batch: int = 32  # for strategy "threshold"
    max_draft_tokens: int = 8  # for strategy "adaptive": it picks n in 0..max_draft_tokens per sample and step
    draft_path: str | None = None  # draft model for "draft"; None: the cached distilled default
    refresh_draft: bool = True  # keep distilling draft models and eagle heads on each iteration's rollouts
    refresh_seconds: float = 20.0  # the most one refresh may take
    # A refresh's budget as a fraction of the iteration's time before it (generation, inference,
    # training), capped at refresh_seconds; null: refresh_seconds for each drafter
    refresh_budget: float | None = 0.1
    # null: refresh every iteration; else only once a drafter's acceptance falls this far below its
    # acceptance in the first iteration after its last refresh
    refresh_drop: float | None = None
    # Where a refresh's targets come from: "teacher", a forward of the updated policy over the
    # iteration's rollouts (as many as half the budget reaches); "rollout", the top-32 targets and
    # features the engine keeps while it generates (the policy one update before), no forward, so
    # the whole budget trains, on the last refresh_buffer iterations' rollouts
    refresh_targets: str = "teacher"
    refresh_buffer: int = 1  # with refresh_targets "rollout": iterations of rollouts a refresh trains on
    # With refresh_targets "rollout": only samples whose id is a multiple of this keep their targets
    # and features (for a head, a hidden state of every cached row: 2.3 KB a token for the default
    # model in float32, 7 KB for a 7B one in bf16), which the engine holds and Ray actors ship back
    refresh_trace_every: int = 1
    # Eagle heads: each refresh also trains a chain's second link, from the head's own predicted
    # feature (half the steps in the same budget). Measured on the default run (RESULTS.md): drafting
    # chains of 2 it raised acceptance (0.69 against 0.42 over iterations 10-19); drafting 1 token,
    # what the selector picks on CPUs, it lowered it (0.62 against 0.73 over iterations 8-15).
    # "auto": unroll a head's refresh when its drafts in the iteration were 1.5 tokens long or more
    # on average (mostly chains of 2+: GPUs, static n >= 2), not when they were mostly single tokens.
    # An unrolled refresh's refresh/<name>_loss includes the second link's terms (refresh/<name>_unrolled).
    refresh_unroll: bool | str = "auto"
    realloc: bool = False  # sample reallocation across instances
    instances: int = 1
    backend: str = "inproc"  # "inproc" (this process) or "ray" (one actor per instance; run.ray_address)
    # A sample's tokens never depend on its batch or instance (see README). null: on the CPU, not on
    # a GPU (no batch-invariant CUDA attention has passed the start-up check yet).
    batch_invariant: bool | None = None
    # backend "ray": the GPUs each generation actor reserves, and it runs on its GPU when this is
    # above 0 (0.5: two actors share one). null: 1 when run.device is a GPU, else 0.
    gpus_per_instance: float | None = None

    def engine_spec(self, device: str = "cpu") -> EngineSpec:
        """The generation instance this section describes (one per generation.instances) on `device`."""
        drafters: list = []
        for text in (self.drafters if self.speculative else []):
            d = drafter_spec(text, tuple(x.name for x in drafters))
            if text == "draft" and self.draft_path:
                d = DraftModel(self.draft_path, d.name)
            drafters.append(d)
        strategy = strategy_spec(self.strategy, tuple(drafters), self.num_draft_tokens, self.threshold_batch, self.max_draft_tokens)
        invariant = self.batch_invariant if self.batch_invariant is not None else device == "cpu"
        keep = self.refresh_draft and self.refresh_targets == "rollout" and any(isinstance(d, (DraftModel, Eagle)) for d in drafters)
        return EngineSpec(tuple(drafters), strategy, self.batch_size, dtype=self.dtype, batch_invariant=invariant,
                          keep_targets=TOP_K if keep else 0, trace_every=self.refresh_trace_every)

    def actor_gpus(self, device: str) -> float:
        """gpus_per_instance resolved for a run on `device`."""
        if self.gpus_per_instance is not None:
            return self.gpus_per_instance
        return 1.0 if device.startswith("cuda") else 0.0


@dataclass(slots=True)
class AlgorithmConfig:
    name: str = "grpo"  # "grpo", "rloo" or "ppo"
    beta: float = 0.0  # KL coefficient (0: no reference model, as TRL's GRPOConfig default)
    # Where the KL term goes, by each algorithm's reference: PPO (TRL, OpenRLHF) and RLOO (TRL)
    # subtract beta * KL from the rewards (per token for PPO, summed over the sequence for RLOO),
    # GRPO adds beta * KL to the loss (TRL). null: that convention.
    kl_in_reward: bool | None = None
    kl_estimator: str | None = None  # k1, k2 or k3; null: k1 in the reward, k3 in the loss
    entropy_coef: float = 0.0  # entropy bonus: the loss subtracts entropy_coef * the policy's per-token entropy
    clip_low: float = 0.2
    clip_high: float | None = None  # None: same as clip_low (DAPO suggests 0.28)
    aggregation: str = "token-mean"  # "token-mean", "sequence-mean" or "sequence-sum-mean"
    scale_rewards: str = "group"  # GRPO: "group", "batch" or "none"
    gamma: float = 1.0  # PPO
    lam: float = 0.95  # PPO
    value_clip: float | None = 0.2  # PPO
    value_coef: float = 0.5  # PPO
    # The old (behaviour) logprobs of the PPO ratio when the engine's numbers may differ from the
    # trainer's (another precision, other kernels): "recompute": the trainer's forward over the
    # rollout (an inference-stage pass), the rollout then importance-weighted by
    # min(pi_trainer / pi_engine, tis_cap) (tis_level "token": per token, as verl's and Yao et al.'s
    # TIS; "sequence": the product over the sequence, applied to its every token; null cap: no
    # weighting); "rollout": the engine's own logprobs, no extra forward, so the ratio
    # pi_theta / pi_engine is itself the importance weight and PPO's clip truncates it; "auto": the
    # engine's when they are checked equal to the trainer's (same precision), else "recompute".
    # With one optimizer step per iteration (train.epochs x mini_batches = 1) and no reference
    # model, "recompute" needs no pass of its own: the training forward's own detached logprobs are
    # the old ones (the weights that sampled), and it measures the gap to the engine's as it goes.
    old_logprobs: str = "auto"
    tis_cap: float | None = 2.0
    tis_level: str = "token"


@dataclass(slots=True)
class TrainConfig:
    iterations: int = 12
    learning_rate: float = 3e-5
    critic_learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"  # "constant", "linear" or "cosine"
    warmup_steps: int = 0
    mini_batches: int = 1  # optimizer steps per iteration (per epoch)
    epochs: int = 1  # passes over each iteration's samples (TRL's num_iterations)
    micro_batch_tokens: int = 2048  # gradient accumulation: at most this many tokens per forward
    # Compute each prompt once for its samples in the trainer's forwards (a row holds the prompt,
    # then its completions, each seeing the prompt and itself); false: a row per sample, prompt repeated.
    share_prompts: bool = True
    # Keep only each decoder layer's input for the backward pass and run the layer again there
    # (TRL's gradient_checkpointing, on by default there): a fraction of the activation memory for
    # about a tenth more training time here; the same gradients.
    gradient_checkpointing: bool = False
    # Run the trainer's output layer this many completion rows at a time and compute each piece's
    # [rows, vocabulary] logits again in the backward pass instead of keeping them (as Liger's fused
    # linear cross-entropy, TRL's use_liger_kernel): what large vocabularies need (Qwen's 152k: 0.6 MB
    # of float32 logits a token); costs one more output-layer forward. null: all rows at once.
    logits_chunk: int | None = None
    # Run no forward or backward for samples whose every advantage is zero (a GRPO or RLOO group
    # that all scored alike) when nothing else in the loss reads them (no critic, no entropy bonus,
    # no KL term in the loss): their gradient is exactly zero, so every update is the same (to
    # float32 summation order), and the loss's normalisation still counts their tokens. The logged
    # entropy, clip fraction and engine/trainer logprob gap then cover the trained samples.
    skip_zero_advantage: bool = True
    seed: int = 0
    logprob_check_every: int = 10  # iterations between checks that the engine's logprobs still match the trainer's
    # The trainer's compute precision: "bfloat16" runs its forwards under autocast over float32
    # master weights (optimizer state, gradients and losses stay float32), "float32" runs them in
    # float32. null: bfloat16 where the hardware computes it natively (a CPU with AVX512-BF16 or
    # AMX, a GPU), float32 elsewhere.
    dtype: str | None = None
    # Trainer processes: 1 trains in this process; N > 1 runs N Ray actors (torch.distributed, gloo
    # on CPU, NCCL on GPU), each on its share of every mini-batch, gradients summed over them.
    workers: int = 1
    # With workers > 1: each worker keeps the AdamW state of its share of the parameters only
    # (ZeRO stage 1: 1/N of the 8 bytes a parameter) and the updated shares are gathered; false:
    # every worker keeps and steps all of it. The updates are the same either way.
    shard_optimizer: bool = True

    def compute_dtype(self, device: str = "cpu") -> str:
        """The precision `dtype` resolves to on this machine."""
        if self.dtype is not None:
            return self.dtype
        from rlhfspec.models.hardware import native_bf16

        return "bfloat16" if device.startswith("cuda") or native_bf16() else "float32"


@dataclass(slots=True)
class RunConfig:
    output_dir: str = "runs/grpo_arith"
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    tensorboard: bool = True
    wandb: bool = False
    threads: int | None = None
    # The Ray cluster to join (generation.backend ray, train.workers > 1); null: a local one started by the run
    ray_address: str | None = None
    # Where the policy, reference, critic, reward model and in-process engine run: "auto" (a CUDA GPU
    # when torch sees one, else the CPU), "cpu", "cuda" or "cuda:N". On a GPU run each Ray training
    # worker (train.workers > 1) takes a GPU of its own and each generation actor
    # generation.gpus_per_instance of one.
    device: str = "auto"
    # The run's own process (which trains when train.workers is 1) keeps freed memory for reuse
    # instead of giving large blocks back to the system as they are freed (glibc; rlhfspec/allocator.py):
    # fewer page faults in every training step, a higher floor of resident memory between iterations.
    # Ray training workers give their step's memory back as they wait (they share the machine).
    keep_freed_memory: bool = True


@dataclass(slots=True)
class Config:
    model: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def device(self) -> str:
        """run.device resolved: "auto" is "cuda" when torch sees a CUDA GPU, else "cpu"."""
        return hardware.check_device(self.run.device, "run.device")

    def engine_device(self) -> str:
        """Where the generation instances run: run.device in this process; on Ray, an actor's own
        GPU ("cuda", the one Ray gave it) when it reserves one, else its CPUs."""
        device = self.device()
        if self.generation.backend != "ray":
            return device
        return "cuda" if self.generation.actor_gpus(device) else "cpu"

    def generation_dtype(self, device: str = "cpu") -> str:
        """The precision the engine generates in (generation.dtype, else the weights')."""
        return self.generation.dtype or self.model.dtype

    def validate(self) -> None:
        """Every setting checked before anything expensive (model loading) runs: one sentence
        naming the first bad one. Also fills the per-algorithm KL defaults (kl_in_reward,
        kl_estimator) left null."""
        from rlhfspec.engine.sampling import SamplingParams

        for part in dataclasses.fields(self):  # settings made in Python are typed as a file's are
            coerce_fields(getattr(self, part.name), part.name, "config")
        g, a, t, r, d = self.generation, self.algorithm, self.train, self.run, self.data
        if a.kl_in_reward is None:
            a.kl_in_reward = a.name in ("ppo", "rloo")
        if a.kl_estimator is None:
            a.kl_estimator = "k1" if a.kl_in_reward else "k3"
        checks = [
            (t.learning_rate > 0, f"train.learning_rate is {t.learning_rate}; it must be > 0."),
            (t.critic_learning_rate > 0, f"train.critic_learning_rate is {t.critic_learning_rate}; it must be > 0."),
            (t.weight_decay >= 0, f"train.weight_decay is {t.weight_decay}; it must be >= 0."),
            (t.max_grad_norm > 0, f"train.max_grad_norm is {t.max_grad_norm}; it must be > 0."),
            (all(0 <= b < 1 for b in t.adam_betas), f"train.adam_betas are {list(t.adam_betas)}; each must be in [0, 1)."),
            (t.iterations >= 1, f"train.iterations is {t.iterations}; it must be >= 1."),
            (t.epochs >= 1, f"train.epochs is {t.epochs}; it must be >= 1."),
            (t.mini_batches >= 1, f"train.mini_batches is {t.mini_batches}; it must be >= 1."),
            (t.micro_batch_tokens >= 1, f"train.micro_batch_tokens is {t.micro_batch_tokens}; it must be >= 1."),
            (t.workers >= 1, f"train.workers is {t.workers}; it must be >= 1 (1 trains in this process)."),
            (t.logits_chunk is None or t.logits_chunk >= 1, f"train.logits_chunk is {t.logits_chunk}; it must be >= 1 (or null: all rows at once)."),
            (t.warmup_steps >= 0, f"train.warmup_steps is {t.warmup_steps}; it must be >= 0."),
            (t.lr_schedule in ("constant", "linear", "cosine"), f"train.lr_schedule {t.lr_schedule!r} is not constant, linear or cosine."),
            (g.temperature > 0, "generation.temperature must be > 0 for RL (greedy rollouts have no exploration)."),
            (g.num_generations >= 1, f"generation.num_generations is {g.num_generations}; it must be >= 1."),
            (a.name in ("grpo", "rloo", "ppo"), f"algorithm.name {a.name!r} is not grpo, rloo or ppo."),
            (a.name == "ppo" or g.num_generations >= 2,
             f"{a.name} compares samples of one prompt; generation.num_generations must be >= 2."),
            (g.batch_size >= 1, f"generation.batch_size is {g.batch_size}; it must be >= 1."),
            (g.instances >= 1, f"generation.instances must be at least 1, got {g.instances}."),
            (g.strategy in STRATEGIES, f"generation.strategy {g.strategy!r} is not one of {', '.join(STRATEGIES)}."),
            (g.refresh_seconds > 0, f"generation.refresh_seconds is {g.refresh_seconds}; it must be > 0."),
            (g.refresh_budget is None or 0 < g.refresh_budget <= 1,
             f"generation.refresh_budget is {g.refresh_budget}; it must be in (0, 1] (or null: refresh_seconds per drafter)."),
            (g.refresh_drop is None or 0 <= g.refresh_drop < 1,
             f"generation.refresh_drop is {g.refresh_drop}; it must be in [0, 1) (or null: refresh every iteration)."),
            (g.refresh_targets in ("teacher", "rollout"),
             f"generation.refresh_targets is {g.refresh_targets!r}; it must be 'teacher' or 'rollout'."),
            (g.refresh_buffer >= 1, f"generation.refresh_buffer is {g.refresh_buffer}; it must be at least 1 (iterations of rollouts)."),
            (g.refresh_unroll in (True, False, "auto"),
             f"generation.refresh_unroll is {g.refresh_unroll!r}; it must be true, false or 'auto'."),
            (g.refresh_trace_every >= 1,
             f"generation.refresh_trace_every is {g.refresh_trace_every}; it must be at least 1 (1: every sample keeps its targets)."),
            (a.beta >= 0, f"algorithm.beta is {a.beta}; it must be >= 0."),
            (a.kl_estimator in ("k1", "k2", "k3"), f"algorithm.kl_estimator {a.kl_estimator!r} is not k1, k2 or k3."),
            (a.beta == 0 or a.kl_in_reward or a.kl_estimator != "k1",
             "algorithm.kl_estimator k1 in the loss has zero expected gradient (E[grad log pi] = 0), so it would not pull "
             "towards the reference; use k3 or k2 in the loss, or k1 with algorithm.kl_in_reward true."),
            (a.entropy_coef >= 0, f"algorithm.entropy_coef is {a.entropy_coef}; it must be >= 0."),
            (t.logprob_check_every >= 1, f"train.logprob_check_every is {t.logprob_check_every}; it must be >= 1."),
            (self.model.dtype in ("float32", "fp32", "bfloat16", "bf16"),
             f"model.dtype {self.model.dtype!r} is not float32 or bfloat16 (the master weights' precision; float16 weights "
             "lose small updates: keep float32 weights and train in bfloat16 with train.dtype bfloat16)."),
            (t.dtype in (None, "float32", "bfloat16"), f"train.dtype {t.dtype!r} is not float32 or bfloat16 (or null: chosen by the hardware)."),
            (g.dtype in (None, "float32", "bfloat16"), f"generation.dtype {g.dtype!r} is not float32 or bfloat16 (or null: the trainer's precision)."),
            (g.rounding in ROUNDINGS, f"generation.rounding {g.rounding!r} is not one of {', '.join(ROUNDINGS)}."),
            (a.aggregation in AGGREGATIONS, f"algorithm.aggregation {a.aggregation!r} is not one of {', '.join(AGGREGATIONS)}."),
            (a.scale_rewards in ("group", "batch", "none"), f"algorithm.scale_rewards {a.scale_rewards!r} is not group, batch or none."),
            (a.clip_low > 0, f"algorithm.clip_low is {a.clip_low}; it must be > 0."),
            (a.old_logprobs in ("auto", "recompute", "rollout"), f"algorithm.old_logprobs {a.old_logprobs!r} is not auto, recompute or rollout."),
            (a.tis_cap is None or a.tis_cap >= 1, f"algorithm.tis_cap is {a.tis_cap}; it must be >= 1 (or null: no importance weighting)."),
            (a.tis_level in ("token", "sequence"), f"algorithm.tis_level {a.tis_level!r} is not token or sequence."),
            (a.old_logprobs != "rollout" or (not g.top_k and g.top_p >= 1.0),
             "algorithm.old_logprobs rollout uses the engine's logprobs as the behaviour policy's, but with generation.top_k or "
             "top_p the engine samples from a filtered distribution the trainer does not score; use recompute."),
            (d.prompts_per_iteration >= 1, f"data.prompts_per_iteration is {d.prompts_per_iteration}; it must be >= 1."),
            (d.task == "arithmetic" or Path(d.task).exists(), f"data.task {d.task} is neither 'arithmetic' nor an existing file or directory."),
            (r.checkpoint_every >= 1, f"run.checkpoint_every is {r.checkpoint_every}; it must be >= 1."),
            (r.keep_checkpoints >= 1, f"run.keep_checkpoints is {r.keep_checkpoints}; it must be >= 1."),
            (r.threads is None or r.threads >= 1, f"run.threads is {r.threads}; it must be >= 1 (or null for torch's default)."),
        ]
        for ok, message in checks:
            if not ok:
                raise RlhfspecError(message)
        for text in g.drafters if g.speculative else []:
            check_drafter(text, "generation.drafters:")
        SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_new_tokens=g.max_new_tokens)
        if g.backend not in BACKENDS:
            raise RlhfspecError(f"generation.backend {g.backend!r} is not one of {', '.join(BACKENDS)}.")
        engine = self.engine_device()  # run.device checked on the way
        if g.gpus_per_instance is not None and g.gpus_per_instance < 0:
            raise RlhfspecError(f"generation.gpus_per_instance is {g.gpus_per_instance}; it must be >= 0 (or null: 1 on a GPU run, 0 on the CPU).")
        if g.gpus_per_instance and g.backend != "ray":
            raise RlhfspecError(f"generation.gpus_per_instance is {g.gpus_per_instance}, but only Ray actors reserve GPUs; "
                                "in-process instances run on run.device (set generation.backend ray, or drop gpus_per_instance).")
        if g.batch_invariant and engine.startswith("cuda"):
            raise RlhfspecError("generation.batch_invariant is true, but no batch-invariant attention has passed the start-up check "
                                "on CUDA yet; set it false (or null: on the CPU only) for generation on a GPU.")
        g.engine_spec(engine)  # one sentence for a drafter or strategy setting no instance could run
        if r.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise RlhfspecError("run.wandb is true but wandb is not installed; pip install 'rlhfspec[wandb]' (or set run.wandb false).")
