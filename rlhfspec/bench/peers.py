"""`rlhfspec bench trl`: TRL's GRPOTrainer and rlhfspec's trainer on the same job, taking turns.

rlhfspec's trainer runs in this process and TRL's in a process of its own; one computes while the
other waits, iteration by iteration (`turn_order`), so that both see the machine in the same state
however its speed drifts over the hour a run takes. Both read one checkpoint (rlhfspec's export of
model.policy, as `rlhfspec export` writes it), see the same prompts in the same order (rlhfspec's
own prompt source, handed to TRL as a dataset, both checked at run time) and the same settings as
far as TRL has them; what cannot be matched is listed in the output (`differences`).
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rlhfspec.bench.common import machine, median, results_file, write_json, write_section
from rlhfspec.errors import RlhfspecError
from rlhfspec.rl.config import Config
from rlhfspec.rl.config_files import load_config
from rlhfspec.bench import same_update
from rlhfspec.rl.learner import skips_zero_advantage

STAGES = ("generation_s", "scoring_s", "training_s", "other_s", "iteration_s")
QUICK = ["--data.prompts_per_iteration", "4", "--generation.num_generations", "4", "--generation.max_new_tokens", "64"]


@dataclass
class PeersBenchConfig:
    config: str | None = None  # YAML job; None: the built-in defaults, which are the default run (configs/grpo_arith.yaml)
    iterations: int = 4
    seed: int = 0
    overrides: list[str] = field(default_factory=list)  # --section.key value, applied last
    trl_micro_batch: int | None = None  # TRL's per_device_train_batch_size; None: rlhfspec's train.micro_batch_tokens worth
    interleave: bool = True  # the sides take turns iteration by iteration (turn_order); False: all of rlhfspec's, then TRL's
    replay_iterations: int = 1  # the update check replays rlhfspec's first N iterations' samples into TRL, one step each
    quick: bool = False

    @classmethod
    def make_quick(cls, **kw) -> "PeersBenchConfig":
        """2 iterations of 4 prompts x 4 completions, at most 64 new tokens."""
        return cls(**{"iterations": 2, **kw, "quick": True})

    def job(self) -> Config:
        extra = [*(QUICK if self.quick else []),
                 "--train.iterations", str(self.iterations), "--train.seed", str(self.seed), *self.overrides]
        c = load_config(self.config, extra)
        c.validate()
        if not 1 <= self.replay_iterations <= c.train.iterations:
            raise RlhfspecError(f"--replay-iterations {self.replay_iterations} is not between 1 and the run's {c.train.iterations} iterations.")
        c.train.dtype = c.train.compute_dtype("cpu")  # one precision, resolved once, for both sides
        c.run.device = "cpu"  # TRL's side runs with use_cpu
        return c

    def command(self) -> str:
        cmd = "rlhfspec bench trl" + (" --quick" if self.quick else "") + (f" --config {self.config}" if self.config else "")
        cmd += f" --iterations {self.iterations} --seed {self.seed}"
        cmd += f" --trl-micro-batch {self.trl_micro_batch}" if self.trl_micro_batch else ""
        cmd += "" if self.interleave else " --sequential"
        cmd += f" --replay-iterations {self.replay_iterations}" if self.replay_iterations != 1 else ""
        return cmd + "".join(f" {o}" for o in self.overrides)


def run(cfg: PeersBenchConfig, json_path: str | None = None, record: bool = False, log=print, out_dir: Path | None = None) -> dict:
    """rlhfspec's trainer and TRL's GRPOTrainer (in a process of its own) on job cfg.job(), taking
    turns iteration by iteration (`turn_order`); per-iteration stage times, tokens and rewards of
    both, a table (RESULTS.md section "trl"), a PNG and optionally JSON."""
    try:
        import trl
    except ImportError:
        raise RlhfspecError("bench trl needs TRL: pip install -e '.[peers]'") from None
    from rlhfspec.bench import trl_grpo
    from rlhfspec.rl.trainer import prompt_source

    c = cfg.job()
    trl_grpo.check_mappable(c)
    p, g, n = c.data.prompts_per_iteration, c.generation.num_generations, c.train.iterations
    source = prompt_source(c)
    rows = [source.next(p) for _ in range(n)]  # what both sides should see, iteration by iteration
    order = turn_order(n, cfg.interleave)
    with tempfile.TemporaryDirectory(prefix="rlhfspec-bench-trl-") as tmp:
        model_dir, tokenizer = export_policy(c.model.policy, c.model.dtype, Path(tmp) / "policy")
        longest = max(len(_prompt_ids(tokenizer, r["prompt"])) for batch in rows for r in batch)
        micro = cfg.trl_micro_batch or default_micro_batch(p * g, longest + c.generation.max_new_tokens, c.train.micro_batch_tokens)
        log(f"job: {p} prompts x {g} completions, {c.generation.max_new_tokens} new tokens, {n} iterations, {c.train.dtype} on both sides; "
            f"TRL micro-batches of {micro} samples; iterations {_order_text(order)}")
        log(f"TRL {trl.__version__} GRPOTrainer: setting up in its own process")
        theirs = trl_grpo.TrlProcess(c, model_dir, [r for batch in rows for r in batch], c.train.dtype, micro, Path(tmp) / "trl",
                                     torch.get_num_threads(), lambda m: log(f"  TRL {m}"))
        try:
            ours = _Rlhfspec(c, model_dir, Path(tmp) / "rlhfspec", lambda m: log(f"  rlhfspec {m}"), cfg.replay_iterations)
            try:
                for side in order:
                    if side == "rlhfspec":
                        ours.step()
                    else:
                        theirs.turn()
                our_runs, our_rows = ours.finish()
            finally:
                ours.close()
            first = ours.first
            del ours  # its trainer's weights and optimizer state, before TRL's replay loads another model
            gc.collect()
        finally:
            theirs.close()
        same = first
        if "skipped" not in first:
            kept = len(first["steps"])
            log(f"same update: TRL's optimizer steps on rlhfspec's samples of iterations 0..{kept - 1}, in place of its own")
            replayed = trl_grpo.replay(c, model_dir, [r for batch in rows[:kept] for r in batch],
                                       [(s["prompt_ids"], s["completions"]) for s in first["steps"]], c.train.dtype, micro,
                                       Path(tmp) / "trl-replay")
            same = same_update.update_gap(first, replayed)
            del first, replayed
    trl_result = theirs.result
    trl_runs = [{k: v for k, v in r.items() if k != "generate_and_score_s"} for r in trl_result["records"]]
    texts = [[_text(r["prompt"]) for r in batch] for batch in rows]
    checks = {
        "same_prompts_in_order": [[_text(r["prompt"]) for r in b] for b in our_rows] == texts == [s["prompts"] for s in trl_result["seen"]],
        "same_prompt_ids": all(ids == _prompt_ids(tokenizer, t) for s in trl_result["seen"] for t, ids in zip(s["prompts"], s["prompt_ids"])),
    }
    trl_batching = trl_result["batching"]
    import transformers

    runs = {"rlhfspec": our_runs, "trl": trl_runs}
    kept = {side: (rs[1:] or rs) for side, rs in runs.items()}
    medians = {side: {k: round(median([r[k] for r in rs]), 2) for k in STAGES} for side, rs in kept.items()}
    result = {
        "machine": machine(), "command": cfg.command() + (f" --json {json_path}" if json_path else "") + (" --record" if record and out_dir is None else ""),
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "job": _job(c), "precision": c.train.dtype, "trl": trl_batching, "checks": checks, "order": order,
        "medians_over": f"iterations 1..{n - 1}" if n > 2 else "iteration 1" if n == 2 else "iteration 0",
        "medians": medians,
        "speedup": {k: round(medians["trl"][k] / max(medians["rlhfspec"][k], 1e-9), 2) for k in ("generation_s", "training_s", "iteration_s")},
        "runs": {side: [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in rs] for side, rs in runs.items()},
        "same_update": same,
        "differences": differences(c, trl_batching),
    }
    if not all(checks.values()):
        log(f"warning: the two sides did not see the same prompts ({checks}); the comparison is not like for like")
    write_json(json_path, result)
    from rlhfspec.bench.plots import peer_curves

    results = results_file(record) if out_dir is None else Path(out_dir) / "RESULTS.md"
    png = peer_curves(result["runs"], results.parent / "trl_peers.png")
    log(write_section("trl", _markdown(result, png.name), path=results))
    result["png"], result["results"] = str(png), str(results)
    return result


def export_policy(source: str, dtype: str, out: Path):
    """`source` written as a Hugging Face checkpoint by rlhfspec's own exporter (what `rlhfspec export`
    writes), so that both trainers read the same weights and tokenizer; (directory, tokenizer)."""
    from rlhfspec.models.checkpoint import save_pretrained
    from rlhfspec.models.loader import load_model

    model, tokenizer = load_model(source, dtype=dtype)
    if tokenizer is None:
        raise RlhfspecError(f"{source} has no tokenizer; both trainers need one to encode prompts.")
    path = save_pretrained(model, out, tokenizer=tokenizer)
    del model
    return Path(path), tokenizer


def default_micro_batch(samples: int, longest: int, token_budget: int) -> int:
    """The most samples per TRL forward (a divisor of the iteration's samples, so every step
    accumulates over equal micro-batches) whose padded length stays within rlhfspec's token budget."""
    fits = [d for d in range(1, samples + 1) if samples % d == 0 and d * longest <= token_budget]
    return max(fits, default=1)


def turn_order(iterations: int, interleave: bool) -> list[str]:
    """Which side computes each turn of bench trl (one iteration a turn). Interleaved, each
    iteration's pair in ABBA order (rlhfspec, TRL, TRL, rlhfspec, ...), so that a machine that grows
    slower or faster during the run weighs on both sides alike, and neither always goes first;
    otherwise all of rlhfspec's iterations, then all of TRL's."""
    if not interleave:
        return ["rlhfspec"] * iterations + ["trl"] * iterations
    pairs = [("rlhfspec", "trl") if i % 2 == 0 else ("trl", "rlhfspec") for i in range(iterations)]
    return [side for pair in pairs for side in pair]


def _order_text(order: list[str]) -> str:
    n = len(order) // 2
    if order == turn_order(n, False):
        return "back to back: all of rlhfspec's, then all of TRL's"
    return "interleaved, each pair in ABBA order: " + ", ".join(_LABELS[side] for side in order[:4]) + (", ..." if n > 2 else "")


_LABELS = {"rlhfspec": "rlhfspec", "trl": "TRL"}


class _Rlhfspec:
    """rlhfspec's Trainer on job c from the exported checkpoint, one iteration per `step()`;
    `finish()` gives its records in bench terms and the prompt rows it drew."""

    def __init__(self, c: Config, model_dir: Path, run_dir: Path, log, replay_iterations: int = 1):
        from rlhfspec.rl.trainer import Trainer

        cfg = replace(c, model=replace(c.model, policy=str(model_dir)),
                      run=replace(c.run, output_dir=str(run_dir), tensorboard=False, wandb=False, checkpoint_every=c.train.iterations))
        self.trainer = Trainer(cfg, progress=False, log=log)
        self.trainer.source = _Recorded(self.trainer.source)
        self.trainer.rollout = same_update.KeptRollout(self.trainer.rollout)
        self.iterations, self.records = self.trainer.iterate(), []
        self.first: dict | None = None  # same_update.first_step of the first iteration, next_step of the next ones replayed
        self.replay_iterations = replay_iterations

    def step(self) -> None:
        self.records.append(next(self.iterations))
        if len(self.records) == 1:
            self.first = same_update.first_step(self.trainer, self.records[0])
        elif len(self.records) <= self.replay_iterations:
            same_update.next_step(self.first, self.trainer, self.records[-1])

    def finish(self) -> tuple[list[dict], list[list[dict]]]:
        if next(self.iterations, None) is not None:
            raise RlhfspecError("bench trl gave rlhfspec's trainer fewer turns than its iterations.")
        out = [{"iteration": r["iteration"], "generation_s": r["generation_s"], "scoring_s": r["inference_s"], "training_s": r["training_s"],
                "other_s": r["sync_s"], "iteration_s": r["iteration_s"], "gen_tokens": r["gen_tokens"],
                "completion_len_max": r["completion_len_max"], "reward": r["reward"],
                "skipped_samples": r.get("skipped_samples", 0)} for r in self.records]
        return out, self.trainer.source.batches

    def close(self) -> None:
        self.iterations.close()  # the trainer's own close, when its run ended early


class _Recorded:
    """A prompt source that keeps every batch it hands out."""

    def __init__(self, source):
        self.source, self.batches = source, []

    def next(self, n: int) -> list[dict]:
        rows = self.source.next(n)
        self.batches.append(rows)
        return rows

    def __getattr__(self, name):
        return getattr(self.source, name)


def _prompt_ids(tokenizer, prompt) -> list[int]:
    from rlhfspec.data.chat import encode_prompt

    return encode_prompt(tokenizer, prompt)


def _text(prompt):
    return prompt[0]["content"] if isinstance(prompt, list) and len(prompt) == 1 else prompt


def _job(c: Config) -> dict:
    g, a, t = c.generation, c.algorithm, c.train
    return {"task": c.data.task, "prompts_per_iteration": c.data.prompts_per_iteration, "num_generations": g.num_generations,
            "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k,
            "learning_rate": t.learning_rate, "lr_schedule": t.lr_schedule, "beta": a.beta, "clip": [a.clip_low, a.clip_high or a.clip_low],
            "aggregation": a.aggregation, "scale_rewards": a.scale_rewards, "rewards": c.reward.functions, "seed": t.seed,
            "iterations": t.iterations, "policy": c.model.policy,
            "rlhfspec_generation": {"speculative": g.speculative, "strategy": g.strategy, "drafters": g.drafters,
                                    "batch_invariant": g.engine_spec(c.engine_device()).batch_invariant, "instances": g.instances},
            "rlhfspec_micro_batch_tokens": t.micro_batch_tokens}


def differences(c: Config, trl: dict) -> list[str]:
    """Every semantic difference between the two runs that the bench does not remove."""
    g = c.generation
    invariant = g.engine_spec(c.engine_device()).batch_invariant
    spec = _decoding({"speculative": g.speculative, "strategy": g.strategy, "drafters": g.drafters})
    out = [
        f"Generation: rlhfspec's engine (ragged KV cache, continuous batching of up to {g.batch_size} samples, one prefill per "
        f"prompt shared by its group, {spec}, {'batch-invariant' if invariant else 'fused'} kernels, lossless) vs "
        f"transformers' generate in TRL (all {trl['generation_batch_size']} samples in one left-padded batch, every row's prompt "
        "prefilled, decoding until its longest sample ends; TRL's vLLM mode would share prefills through vLLM's prefix cache). Both sample "
        "from the policy's own distribution, but from different random streams: the completions differ, so the reward "
        "curves compare only statistically (run several --seed values for their spread).",
        ("Training micro-batches: rlhfspec computes each prompt once for its samples (a forward runs the distinct prompts and "
         "the completions packed without padding, each completion seeing its prompt and itself: train.share_prompts), a prompt's "
         f"samples grouped with others of similar width up to train.micro_batch_tokens ({c.train.micro_batch_tokens}) tokens per forward"
         if c.train.share_prompts else "Training micro-batches: rlhfspec groups samples of similar length up to train.micro_batch_tokens "
         f"({c.train.micro_batch_tokens}) tokens per forward, padded to each group's longest") +
        f"; TRL runs {trl['per_device_train_batch_size']} "
        f"samples per forward, padded to the longest, accumulating over {trl['gradient_accumulation_steps']} of them. Both take "
        "one optimizer step per iteration over all its samples" + (
            "; rlhfspec runs no forward or backward for the samples of a group that all scored alike (zero advantage, "
            "so exactly zero gradient here: train.skip_zero_advantage; the table's 'skipped' column), TRL runs them all: the same "
            "update, to float32 summation order, and rlhfspec's logged entropy covers the trained samples only."
            if skips_zero_advantage(c, critic=False) else "."),
    ]
    if c.train.dtype == "bfloat16":
        gen_dtype = c.generation_dtype()
        correction = ("taking the engine's logprobs as the behaviour policy's (algorithm.old_logprobs rollout)"
                      if c.algorithm.old_logprobs == "rollout" else
                      "taking the old logprobs from the trainer's forward (the training forward's own, detached, when the "
                      "iteration takes one optimizer step) and weighting each token by "
                      f"min(pi_trainer / pi_engine, {c.algorithm.tis_cap})")
        out.append(f"Precision (bfloat16 on both): rlhfspec generates in {gen_dtype} and trains under bf16 autocast over float32 "
                   f"weights, {correction}; TRL generates and trains under the same bf16 autocast "
                   "(accelerate's) and takes the training forward's own detached logprobs as the old ones (ratio exactly 1), "
                   "with no such correction.")
    else:
        out.append("Precision (float32 on both): rlhfspec takes the engine's logprobs as the old ones once they are checked "
                   "against the trainer's within 1e-3 (with one optimizer step per iteration the first iteration takes the "
                   "training forward's own, which makes that check); TRL takes the training forward's own detached logprobs "
                   "(ratio exactly 1).")
    out += [
        "Gradient checkpointing: off on both (TRL's default is on), so both keep activations for the backward pass."
        if not c.train.gradient_checkpointing else
        "Gradient checkpointing: on on both (train.gradient_checkpointing; TRL's default), so both recompute each layer "
        "in the backward pass.",
        *([f"Learning-rate warm-up ({c.train.warmup_steps} steps): rlhfspec's step k trains at lr x (k + 1) / "
           f"{c.train.warmup_steps}, transformers' schedule in TRL at lr x k / {c.train.warmup_steps}, so TRL's first step "
           "moves no weight and its warm-up ends one step later."] if c.train.warmup_steps else []),
        "Stage boundaries: scoring is rlhfspec's inference stage (rewards, advantages, any old-logprob forward) and, for "
        "TRL, the part of _generate_and_score_completions after _generate (padding, rewards, advantages, metrics); "
        "training is the rest of the iteration (TRL: its optimizer step, from on_step_begin to on_step_end); rlhfspec's "
        "'other' is its drafter refresh. Checkpoint writing is outside both.",
        "Reward functions see chat completions ([{'role': 'assistant', 'content': ...}]) in TRL, whose prompts are chat "
        "messages, and plain text in rlhfspec; the built-in rewards read the same text from either, and TRL's extra "
        "keyword arguments (trainer_state, log_extra, log_metric) are ignored.",
    ]
    return out


def _decoding(g: dict) -> str:
    return f"speculative decoding ({g['strategy']}, drafters {', '.join(g['drafters'])})" if g["speculative"] else "plain decoding"


def _markdown(r: dict, png: str) -> str:
    j, t, m = r["job"], r["trl"], r["medians"]
    rg = j["rlhfspec_generation"]
    checks = r["checks"]
    lines = [
        "## Side by side: rlhfspec vs TRL's GRPOTrainer on the same job",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Versions: TRL {r['versions']['trl']}, transformers {r['versions']['transformers']}, torch {r['versions']['torch']}  ",
        f"Job: GRPO on {j['task']} (seed {j['seed']}), {j['prompts_per_iteration']} prompts x {j['num_generations']} completions per "
        f"iteration, at most {j['max_new_tokens']} new tokens, temperature {j['temperature']:g}, lr {j['learning_rate']:g} "
        f"({j['lr_schedule']}), beta {j['beta']:g}, clip {j['clip'][0]:g}/{j['clip'][1]:g}, {j['aggregation']} (TRL loss_type "
        f"\"{t['loss_type']}\"), rewards {', '.join(j['rewards'])}, {r['precision']} on both, one optimizer step per iteration, "
        f"{j['iterations']} iterations, policy {j['policy']} (exported once, read by both). rlhfspec generates with "
        f"{_decoding(rg)}; TRL trains {t['per_device_train_batch_size']} samples per forward x {t['gradient_accumulation_steps']} "
        f"accumulated forwards, gradient checkpointing {'on' if t.get('gradient_checkpointing') else 'off'}.  ",
        f"Checked at run time: same prompts in the same order on both sides: {'yes' if checks['same_prompts_in_order'] else 'NO'}; "
        f"same prompt token ids: {'yes' if checks['same_prompt_ids'] else 'NO'}; {same_update.text(r['same_update'])}.  ",
        f"Order: iterations {_order_text(r['order'])}; TRL in a process of its own, one side computing at a time.",
        "",
        "| side | iteration | generation s | scoring s | training s | other s | iteration s | tokens | tokens/s | reward | skipped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, label in (("rlhfspec", "rlhfspec"), ("trl", "TRL")):
        for x in r["runs"][side]:
            lines.append(f"| {label} | {x['iteration']} | {x['generation_s']:.1f} | {x['scoring_s']:.1f} | {x['training_s']:.1f} | "
                         f"{x['other_s']:.1f} | {x['iteration_s']:.1f} | {x['gen_tokens']} | "
                         f"{x['gen_tokens'] / max(x['generation_s'], 1e-9):.0f} | {x['reward']:.3f} | "
                         f"{x.get('skipped_samples', 0) if side == 'rlhfspec' else 0} |")
    s = r["speedup"]
    lines += [
        "",
        f"Medians over {r['medians_over']} (iteration 0 pays one-off warm-ups): rlhfspec {m['rlhfspec']['iteration_s']} s per "
        f"iteration (generation {m['rlhfspec']['generation_s']}, training {m['rlhfspec']['training_s']}), TRL "
        f"{m['trl']['iteration_s']} s (generation {m['trl']['generation_s']}, training {m['trl']['training_s']}): rlhfspec "
        f"**{s['iteration_s']:.2f}x** faster per iteration (generation {s['generation_s']:.2f}x, training {s['training_s']:.2f}x).",
        "",
        f"![reward and iteration time per iteration]({png})",
        "",
        "Differences the bench does not remove:",
        "",
        *[f"- {d}" for d in r["differences"]],
    ]
    return "\n".join(lines)
