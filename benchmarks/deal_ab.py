"""Two Ray training workers (train.workers 2) stepping one fixed batch of the default job's shape
(8 prompts of 50-70 tokens x 8 completions of lognormal length up to 128; 3 groups with zero
advantage, so 5 groups are trained), four times, with each step's seconds and the ranks' wait for
each other in the gradient sum. Ray starts its workers in the driver's working directory, so run it
from the checkout whose code the workers should run:

    cd CHECKOUT && /path/to/.venv/bin/python /path/to/benchmarks/deal_ab.py
"""

import random
import time
from pathlib import Path

import ray
import torch

from rlhfspec.models.loader import load_model
from rlhfspec.rl.config_files import load_config
from rlhfspec.rl.distributed import RayLearners
from rlhfspec.rl.logprobs import Batch
from rlhfspec.rl.objective import Targets

c = load_config(Path(__file__).parents[1] / "configs" / "grpo_arith.yaml", ["--train.workers", "2"])
policy, _ = load_model(c.model.policy, dtype="float32")
learners = RayLearners(c, policy)


@ray.remote(num_cpus=0)
def tree() -> str:
    import rlhfspec

    return str(Path(rlhfspec.__file__).parents[1])


rng = random.Random(0)
prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(50, 70))] for _ in range(8)]
completions = [[rng.randrange(100, 40000) for _ in range(min(128, max(5, int(rng.lognormvariate(4.2, 0.5)))))] for _ in range(64)]
batch = Batch([p for p in prompts for _ in range(8)], completions, True)
advantages = torch.randn(64)
advantages[:24] = 0  # three groups that scored alike: train.skip_zero_advantage runs no forward for them
targets = Targets(batch.mask(), None, advantages)
print(f"workers run the code in {ray.get(tree.remote())}")
for i in range(4):
    start = time.perf_counter()
    stats = learners.optimize(batch, targets, i)
    print(f"step {i}: {time.perf_counter() - start:.2f} s, ranks waiting {stats['allreduce_wait_s']:.2f} s, "
          f"gradient sum {stats['allreduce_s']:.2f} s, weights back {stats['weights_back_s']:.2f} s", flush=True)
learners.close()
