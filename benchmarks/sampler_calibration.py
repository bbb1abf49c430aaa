"""Do both samplers of `bench trl` draw from the policy's own distribution on the real job? For the
default job's iteration-0 prompts of each seed, 64 completions from rlhfspec's engine (the RL
rollout as the trainer runs it: adaptive speculation with n-gram drafts) and 64 from transformers'
`generate` (as TRL's GRPOTrainer calls it: do_sample, temperature 1, top-k 0, top-p 1), then, with
rlhfspec's trainer forward over each sample, every sampled token's log-probability log p(x_t) and
the entropy H_t of the distribution it was drawn from. Under exact sampling E[log p(x_t) + H_t] = 0
at every position (the terms are martingale differences, so their mean has standard error
sqrt(sum d_t^2) / n); a sampler that sharpens or flattens the distribution moves it. Also each
side's mean reward on its samples. With --policy, the policy sampled is that Hugging Face directory
(e.g. `rlhfspec export RUN_DIR OUT` of a run's last checkpoint, to check the samplers after updates)
instead of the default model. Usage:
python benchmarks/sampler_calibration.py [SEED ...] [--policy DIR] [--json PATH]
"""

import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlhfspec.bench.peers import PeersBenchConfig, export_policy
from rlhfspec.data.chat import encode_prompt
from rlhfspec.rewards.compose import RewardSet
from rlhfspec.rl.learner import score_params
from rlhfspec.rl.logprobs import Batch, completion_logprobs
from rlhfspec.rl.trainer import Trainer, prompt_source


def calibration(policy, batch: Batch, params) -> dict:
    """Mean log p(x_t), mean H_t, their sum's mean and its standard error over every completion token."""
    with torch.no_grad():
        logp, mask, ent = completion_logprobs(policy, batch, list(range(len(batch))), params, entropy=True)
    keep = mask.bool()
    d = (logp + ent)[keep].double()
    n = d.numel()
    return {"tokens": n, "mean_logp": logp[keep].double().mean().item(), "mean_entropy": ent[keep].double().mean().item(),
            "mean_logp_plus_entropy": d.mean().item(), "standard_error": math.sqrt((d ** 2).sum().item()) / n}


def main(argv: list[str]) -> None:
    values = {flag: argv[argv.index(flag) + 1] for flag in ("--json", "--policy") if flag in argv}
    json_path = values.get("--json")
    seeds = [int(a) for a in argv if a.isdigit() and a not in values.values()] or [0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        c = PeersBenchConfig().job()
        source = values.get("--policy", c.model.policy)
        model_dir, tokenizer = export_policy(source, c.model.dtype, Path(tmp) / "policy")
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        for seed in seeds:
            c = PeersBenchConfig(seed=seed, iterations=1).job()
            c.model.policy, c.run.output_dir, c.run.tensorboard = str(model_dir), str(Path(tmp) / f"run{seed}"), False
            trainer = Trainer(c, progress=False, log=lambda m: None)
            g, p = c.generation.num_generations, c.data.prompts_per_iteration
            rows = prompt_source(c).next(p)
            prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows for _ in range(g)]
            ids = [i * g + j for i in range(p) for j in range(g)]
            ours = [list(o.token_ids) for o in trainer.rollout.run(prompts, trainer.params, seed, ids, progress=False).outputs]
            trainer.close()
            width = max(map(len, prompts))
            eos = tokenizer.eos_token_id
            inputs = torch.tensor([[eos] * (width - len(q)) + q for q in prompts])
            attention = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
            torch.manual_seed(seed)
            with torch.no_grad():
                out = hf.generate(input_ids=inputs, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=c.generation.max_new_tokens, eos_token_id=eos, pad_token_id=eos)
            theirs = []
            for row in out[:, width:].tolist():
                theirs.append(row[: row.index(eos) + 1] if eos in row else row)
            rewards = RewardSet(list(c.reward.functions), c.reward.weights)
            row_prompts = [r["prompt"] for r in rows for _ in range(g)]
            columns = {k: [r.get(k) for r in rows for _ in range(g)] for k in rows[0] if k != "prompt"}
            entry = {"seed": seed, "policy": source}
            for side, completions in (("rlhfspec", ours), ("transformers", theirs)):
                texts = [tokenizer.decode(x, skip_special_tokens=True) for x in completions]
                _, totals = rewards.score(row_prompts, texts, completions, columns)
                entry[side] = {**calibration(trainer.policy, Batch(prompts, completions, True), score_params(c)),
                               "reward": totals.mean().item()}
                e = entry[side]
                print(f"seed {seed} {side:12s}: {e['tokens']} tokens, mean log p {e['mean_logp']:.4f}, mean entropy "
                      f"{e['mean_entropy']:.4f}, sum {e['mean_logp_plus_entropy']:+.4f} +- {e['standard_error']:.4f} "
                      f"(z {e['mean_logp_plus_entropy'] / e['standard_error']:+.2f}), reward {e['reward']:.3f}", flush=True)
            results.append(entry)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
