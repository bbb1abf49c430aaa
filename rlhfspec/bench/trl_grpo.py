"""TRL's GRPOTrainer on an rlhfspec job: the settings mapped one to one, its stages timed, and the
whole run in a process of its own that computes only in the turns it is given.

TRL times its phases only for trackers, so the subclass here wraps the methods that bound them
(TRL 1.16): `_generate` (prompt tokenization, `transformers.generate`, decoding),
`_generate_and_score_completions` (that plus rewards, advantages and any no-grad forwards) and
`_calculate_rewards`; a callback marks each optimizer step's start and end, and waits there for
the step's turn.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.config import Config

# rlhfspec's algorithm.aggregation -> TRL's loss_type with the same normalisation over one
# optimizer step: "dapo" divides the summed token losses by the tokens of the whole generation
# batch (not of each micro-batch, as "bnpo" does), which is token-mean over the iteration.
LOSS_TYPES = {"token-mean": "dapo", "sequence-mean": "grpo", "sequence-sum-mean": "dr_grpo"}
SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


def check_mappable(c: Config) -> None:
    """One sentence for the first setting of `c` that TRL's GRPOTrainer cannot run as rlhfspec does."""
    a, t, d = c.algorithm, c.train, c.data
    checks = [
        (a.name == "grpo", f"algorithm.name is {a.name!r}; bench trl compares GRPO (TRL's GRPOTrainer)."),
        (not d.curriculum, "data.curriculum is true; TRL trains on a fixed dataset, so the prompts could not follow rlhfspec's "
                           "curriculum (set data.curriculum false)."),
        (a.beta == 0 or not a.kl_in_reward, "algorithm.kl_in_reward is true; TRL's GRPO puts the KL term in the loss only."),
        (a.beta == 0 or a.kl_estimator == "k3", f"algorithm.kl_estimator is {a.kl_estimator}; TRL's GRPO uses k3 in the loss."),
        (t.mini_batches == 1 and t.epochs == 1, f"train.mini_batches {t.mini_batches} and train.epochs {t.epochs}: bench trl "
                                                "compares one optimizer step per iteration (both 1)."),
        (a.entropy_coef == 0, "algorithm.entropy_coef is not 0; bench trl compares runs without an entropy bonus."),
        (c.reward.reward_model is None, "reward.reward_model is set; bench trl compares reward functions only."),
    ]
    for ok, message in checks:
        if not ok:
            raise RlhfspecError(message)


def trl_args(c: Config, out_dir: Path, precision: str, micro_batch: int) -> trl.GRPOConfig:
    """The GRPOConfig for job `c`: one optimizer step per iteration over all P x G samples,
    `micro_batch` samples per forward (gradient accumulation over the rest)."""
    g, a, t = c.generation, c.algorithm, c.train
    samples = c.data.prompts_per_iteration * g.num_generations
    if samples % micro_batch:
        raise RlhfspecError(f"the TRL micro-batch of {micro_batch} samples does not divide an iteration's {samples} samples.")
    steps = samples // micro_batch
    schedule = "constant_with_warmup" if t.lr_schedule == "constant" and t.warmup_steps else SCHEDULES[t.lr_schedule]
    return trl.GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=precision == "bfloat16", fp16=False,
        # As rlhfspec's train.gradient_checkpointing (default off; TRL's default, on, trades speed for memory).
        # activation_checkpointing is transformers' new name for it (the old one, still read by TRL, mirrors it).
        gradient_checkpointing=t.gradient_checkpointing, activation_checkpointing=t.gradient_checkpointing,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=steps, steps_per_generation=steps,
        num_iterations=1, max_steps=t.iterations, num_generations=g.num_generations, max_completion_length=g.max_new_tokens,
        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        learning_rate=t.learning_rate, lr_scheduler_type=schedule, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], adam_epsilon=1e-8, max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",  # torch.optim.AdamW, as rlhfspec's trainer (the HF default is the fused variant)
        beta=a.beta, epsilon=a.clip_low, epsilon_high=a.clip_high, loss_type=LOSS_TYPES[a.aggregation],
        scale_rewards=a.scale_rewards, reward_weights=c.reward.weights,
        shuffle_dataset=False, seed=t.seed, data_seed=t.seed,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )


class TimedGRPOTrainer(trl.GRPOTrainer):
    """GRPOTrainer recording, per optimizer step, the seconds of its stages, the tokens it
    generated, the mean total reward and the prompts (text and token ids) it saw."""

    def __init__(self, *args, turn: "_PipeTurn | None" = None, log=print, **kwargs):
        super().__init__(*args, **kwargs)
        self.records: list[dict] = []
        self.seen: list[dict] = []  # per generation: {"prompts": [text per group], "prompt_ids": [ids per group]}
        self.remove_callback(PrinterCallback)  # it prints every step's log dict; _StepClock logs one line
        self.add_callback(_StepClock(self, turn, log))

    def _generate(self, prompts: list):
        t = time.perf_counter()
        out = super()._generate(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        g = self.num_generations
        self.seen.append({"prompts": [_text(p) for p in prompts[::g]], "prompt_ids": [list(ids) for ids in prompt_ids[::g]]})
        self._current(generation_s=time.perf_counter() - t, gen_tokens=sum(len(c) for c in completion_ids),
                      completion_len_max=max(len(c) for c in completion_ids))
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        t = time.perf_counter()
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        totals = (per_func * self.reward_weights.to(per_func.device)[None]).nansum(dim=1)
        self._current(rewards_s=time.perf_counter() - t, reward=totals.mean().item())
        return per_func

    def _generate_and_score_completions(self, inputs):
        t = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        self._current(generate_and_score_s=time.perf_counter() - t)
        return out

    def _current(self, **values) -> None:
        if not self.records:
            raise RlhfspecError("TRL generated outside an optimizer step; this TRL version drives its loop differently "
                                f"from the {trl.__version__} bench trl was written for.")
        self.records[-1].update(values)


class ReplayGRPOTrainer(trl.GRPOTrainer):
    """GRPOTrainer that samples nothing: its k-th step trains on `steps[k]` = (prompt ids per sample,
    completion token ids per sample, in TRL's order, each prompt's samples in turn) in place of its
    own samples, so that the updates it makes can be set beside rlhfspec's on the same samples;
    `gradients` keeps the clipped gradients the first optimizer step reads and `after_first` the
    weights after it (transformers' names)."""

    def __init__(self, *args, steps: list[tuple[list[list[int]], list[list[int]]]], **kwargs):
        super().__init__(*args, **kwargs)
        self.steps, self.taken = steps, 0
        self.gradients: dict[str, torch.Tensor] | None = None
        self.after_first: dict[str, torch.Tensor] | None = None
        self.add_callback(_KeepFirstStep(self))

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        expected, completions = self.steps[self.taken]
        if [list(p) for p in prompt_ids] != expected:
            raise RlhfspecError(f"TRL's replayed step {self.taken} saw other prompts than the samples it replays were drawn for; "
                                "give replay the rows whose prompts rlhfspec's samples answer, in order.")
        self.taken += 1
        return [list(c) for c in completions], None


class _KeepFirstStep(TrainerCallback):
    def __init__(self, trainer: ReplayGRPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.trainer.gradients is None:
            self.trainer.gradients = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.trainer.after_first is None:
            self.trainer.after_first = {k: v.detach().clone() for k, v in model.state_dict().items()}


def replay(c: Config, model_dir: Path, rows: list[dict], steps: list[tuple[list[list[int]], list[list[int]]]], precision: str,
           micro_batch: int, out_dir: Path) -> dict:
    """TRL's first len(steps) optimizer steps of job `c` from the checkpoint in `model_dir` on `rows`'
    prompts (P per step, in order), step k trained on steps[k] = (prompt ids, completions) in place
    of samples of its own: the first step's loss, gradient norm (before clipping), learning rate and
    clipped gradients, every step's {loss, grad_norm, lr}, and the weights before, after the first
    step and after the last, by transformers' names."""
    from rlhfspec.rewards.compose import resolve

    check_mappable(c)
    model, tokenizer, data = _job_inputs(c, model_dir, rows)
    args = trl_args(replace(c, train=replace(c.train, iterations=len(steps))), out_dir, precision, micro_batch)
    trainer = ReplayGRPOTrainer(model=model, reward_funcs=[resolve(f) for f in c.reward.functions], args=args, train_dataset=data,
                                processing_class=tokenizer, steps=steps)
    trainer.remove_callback(PrinterCallback)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.train()
    logged = [{"loss": float(h["loss"]), "grad_norm": float(h["grad_norm"]), "lr": float(h["learning_rate"])}
              for h in trainer.state.log_history if "loss" in h]
    return {**logged[0], "steps": logged, "gradients": trainer.gradients, "before": before, "after": trainer.after_first,
            "last": {k: v.detach() for k, v in model.state_dict().items()}}


class _StepClock(TrainerCallback):
    """Marks the start and end of each optimizer step (all its micro-batches, the step and clipping)
    and logs the step's line; with a turn, waits for it before the clock starts and hands it back
    after the line (the last step's turn is handed back by the end of the run, so TRL's closing work
    is in it)."""

    def __init__(self, trainer: TimedGRPOTrainer, turn: "_PipeTurn | None", log):
        self.trainer, self.turn, self.log = trainer, turn, log

    def on_train_begin(self, args, state, control, **kwargs):
        if self.turn:
            self.turn.ready()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.turn:
            self.turn.take()
        self.trainer.records.append({"iteration": state.global_step, "_start": time.perf_counter()})

    def on_step_end(self, args, state, control, **kwargs):
        r = self.trainer.records[-1]
        r["iteration_s"] = time.perf_counter() - r.pop("_start")
        r["scoring_s"] = r["generate_and_score_s"] - r["generation_s"]
        r["training_s"] = r["iteration_s"] - r["generate_and_score_s"]
        r["other_s"] = 0.0
        self.log(f"iteration {r['iteration']}: reward {r['reward']:.3f}, {r['iteration_s']:.1f} s (generation "
                 f"{r['generation_s']:.1f} s, {r['gen_tokens']} tokens; scoring {r['scoring_s']:.1f} s; training {r['training_s']:.1f} s)")
        if self.turn and state.global_step < args.max_steps:
            self.turn.give()


def _text(prompt) -> str | list:
    """A conversational prompt's user text (the row's own prompt), else the prompt as given."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict):
        return prompt[0].get("content", prompt)
    return prompt


def train(c: Config, model_dir: Path, rows: list[dict], reward_funcs: list, precision: str, micro_batch: int,
          out_dir: Path, log=print, turn: "_PipeTurn | None" = None) -> TimedGRPOTrainer:
    """Runs c.train.iterations GRPO steps of TRL on `rows` (P rows per iteration, in order) from
    the checkpoint in `model_dir`, each step in its `turn` when one is given; returns the trainer
    with its records."""
    check_mappable(c)
    model, tokenizer, data = _job_inputs(c, model_dir, rows)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=reward_funcs, args=trl_args(c, out_dir, precision, micro_batch),
                               train_dataset=data, processing_class=tokenizer, turn=turn, log=log)
    trainer.train()
    return trainer


def _job_inputs(c: Config, model_dir: Path, rows: list[dict]):
    """The model and tokenizer from `model_dir` and `rows` as TRL's dataset: chat prompts, so that TRL
    applies the tokenizer's chat template as rlhfspec's encode_prompt does."""
    import datasets

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, c.model.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data = datasets.Dataset.from_list([{**r, "prompt": r["prompt"] if isinstance(r["prompt"], list)
                                        else [{"role": "user", "content": r["prompt"]}]} for r in rows])
    return model, tokenizer, data


def batching(args: trl.GRPOConfig) -> dict:
    """The settings that say how TRL batched the run, for the report."""
    return {"per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "steps_per_generation": args.steps_per_generation, "generation_batch_size": args.generation_batch_size,
            "loss_type": args.loss_type, "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}


class TrlProcess:
    """`train` in a process of its own (`python -m rlhfspec.bench.trl_grpo`, a fresh interpreter)
    that computes only in the turns this side gives it (`turn()`: one optimizer step while the
    caller waits), so that the two trainers of bench trl can take turns iteration by iteration on
    one machine, each with its own random streams and thread pool as if it ran alone. Its log lines
    come through `log`; its failure is raised here, with its traceback. The process has set itself
    up (weights, trainer, TRL's start of training) by the time the constructor returns."""

    def __init__(self, c: Config, model_dir: Path, rows: list[dict], precision: str, micro_batch: int, out_dir: Path,
                 threads: int, log=print):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())], pass_fds=[theirs.fileno()])
        theirs.close()
        self.conn = Connection(ours.detach())
        self.log, self.steps_left, self.result = log, c.train.iterations, None
        try:
            self.conn.send((c, model_dir, rows, precision, micro_batch, out_dir, threads))
            self._until("ready")
        except BaseException:
            self.close()
            raise

    def turn(self) -> None:
        """TRL's next optimizer step, this process waiting; after its last, the rest of its run and
        its records (`result`: records, prompts seen, batching)."""
        if not self.steps_left:
            raise RlhfspecError("TRL's run has no step left to take; bench trl gave it more turns than iterations.")
        self.conn.send("go")
        self.steps_left -= 1
        self._until("done" if self.steps_left else "result")

    def close(self) -> None:
        self.conn.close()  # a process still waiting for a turn reads the end of its connection and stops
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _until(self, kind: str) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, ConnectionResetError):
                raise RlhfspecError(f"TRL's process ended without reporting (exit code {self.process.wait()}); what it printed "
                                    "above says why, and a kill by the kernel (-9) means the machine ran out of memory.") from None
            if message[0] == "log":
                self.log(message[1])
            elif message[0] == "error":
                raise RlhfspecError(f"TRL's GRPOTrainer failed in its process:\n{message[1]}")
            elif message[0] == kind:
                if kind == "result":
                    self.result = message[1]
                return
            else:
                raise RlhfspecError(f"TRL's process said {message[0]!r} where bench trl waited for {kind!r}.")


class _PipeTurn:
    """The TRL process's end of the turns: says it is ready, waits for "go", says "done"."""

    def __init__(self, conn):
        self.conn = conn

    def ready(self) -> None:
        self.conn.send(("ready",))

    def take(self) -> None:
        if self.conn.recv() != "go":
            raise RlhfspecError("bench trl's process sent something other than a turn.")

    def give(self) -> None:
        self.conn.send(("done",))


def _serve(conn: Connection) -> None:
    """TrlProcess's process: the job from `conn`, then the whole TRL run, its records sent back at
    the end, or its traceback."""
    from rlhfspec.rewards.compose import resolve

    c, model_dir, rows, precision, micro_batch, out_dir, threads = conn.recv()
    torch.set_num_threads(threads)
    try:
        funcs = [resolve(f) for f in c.reward.functions]
        trainer = train(c, model_dir, rows, funcs, precision, micro_batch, out_dir,
                        log=lambda m: conn.send(("log", m)), turn=_PipeTurn(conn))
        conn.send(("result", {"records": trainer.records, "seen": trainer.seen, "batching": batching(trainer.args)}))
    except BaseException:  # reported to the bench, which raises it; this process ends either way
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
