"""Data-parallel training: train.workers Learners on Ray actors, one torch.distributed process group
(gloo on CPU, NCCL on GPU), each rank on its share of every mini-batch, gradients summed over the ranks
(all-reduced, or reduce-scattered to the ranks that own their optimizer state: rl/zero.py)."""

from __future__ import annotations

import copy
import time

import torch

from rlhfspec.allocator import release_memory
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.hardware import peak_memory_mb
from rlhfspec.models.loader import load_model
from rlhfspec.rl.config import Config
from rlhfspec.rl.learner import Learner, load_critic, load_weights, weight_tensors
from rlhfspec.rl.logprobs import Batch
from rlhfspec.rl.objective import Targets
from rlhfspec.rl.zero import merge_states
from rlhfspec.rollout.ray_backend import connect, free_resource, on_cpu, pack_weights, unpack_weights

# After one rank fails, how long the others get to report their own end before they are taken to
# be stuck in a collective that waits for the failed one.
GRACE_S = 10.0


class _Worker:
    """One training worker in its Ray process: a Learner over its own copy of the models."""

    def __init__(self, config: Config, rank: int, world: int, threads: int):
        torch.set_num_threads(threads)
        self.config, self.rank, self.world = config, rank, world
        self.learner: Learner | None = None

    def rendezvous(self) -> str:
        """tcp://host:port of a port free on this worker's node, where the process group meets."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, address: str) -> None:
        """Load the models (model.policy, the critic under PPO) and join the process group."""
        import torch.distributed as dist

        c = self.config
        device = c.device()  # "cuda" on a GPU run: the one GPU Ray gave this worker
        policy = load_model(c.model.policy, dtype=c.model.dtype, device=device, tokenizer=False)[0].train().requires_grad_(True)
        critic = load_critic(c, device) if c.algorithm.name == "ppo" else None
        backend = "nccl" if policy.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=address, rank=self.rank, world_size=self.world)
        self.learner = Learner(c, policy, critic, self.rank, self.world)

    def optimize(self, batch: Batch, targets: Targets, iteration: int) -> dict:
        stats = self.learner.optimize(batch, targets, iteration)
        release_memory()  # the step's activations, back to the OS while the worker waits for the next
        return {**stats, "worker_peak_mb": peak_memory_mb(self.learner.policy.device)}

    def weights(self) -> tuple:
        """This rank's weights packed into one buffer (`pack_weights`), which Ray hands to the driver
        through shared memory on one node: about 3x faster than a pickled dict of tensors."""
        tensors = weight_tensors(self.learner.policy, self.learner.critic)
        return pack_weights({f"{model}/{name}": t for model, state in tensors.items() for name, t in state.items()})

    def objects(self) -> dict:
        """The optimizer and scheduler states, their tensors on the CPU (the driver may have no GPU)."""
        return on_cpu(self.learner.state_dict()[1])

    def load_state_dict(self, tensors: dict, objects: dict) -> None:
        self.learner.load_state_dict(tensors, objects)


class RayLearners:
    """`train.workers` training workers on the Ray cluster at run.ray_address (or a local one started
    here), with the Learner's interface. Every rank ends each step with the same weights (the
    optimizer state sharded over them or replicated, train.shard_optimizer), and rank 0's are copied
    into `policy` and `critic` (this process's copies, which the inference stage and generation use)
    after every iteration. Its statistics add the gradient sum's seconds (`allreduce_s`, the last
    rank's to get there), the ranks' waiting for each other in it (`allreduce_wait_s`), the copy of
    rank 0's weights into this process (`weights_back_s`) and the largest rank's optimizer state and
    peak memory (`optimizer_state_mb`, `worker_peak_mb`)."""

    def __init__(self, config: Config, policy, critic=None):
        n = config.train.workers
        self.config, self.policy, self.critic, self.size = config, policy, critic, n
        self.owns_cluster = connect(config.run.ray_address)
        import ray

        self.ray, self.workers = ray, []
        gpu = policy.device.type == "cuda"  # a GPU run: each worker takes a GPU of its own
        cpus, gpus = free_resource(n), free_resource(n, kind="GPU") if gpu else 0
        problem = None
        if cpus < n:
            problem = f"train.workers is {n} but the Ray cluster has {cpus:g} free CPUs; each training worker takes one."
        elif gpu and gpus < n:
            problem = f"train.workers is {n} on a GPU run but the Ray cluster has {gpus:g} free GPUs; each training worker takes one."
        if problem:
            self.close()
            raise RlhfspecError(problem)
        threads = max(1, (config.run.threads or torch.get_num_threads()) // n)
        # The precision is resolved here, once: a worker's own hardware check could pick another.
        shipped = copy.deepcopy(config)
        shipped.train.dtype = config.train.compute_dtype(str(policy.device))
        shipped.run.device = "cuda" if gpu else "cpu"
        remote = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(_Worker)
        self.workers = [remote.remote(shipped, rank, n, threads) for rank in range(n)]
        starting = "while loading its models and joining the process group; its log is in the Ray session directory"
        address = self._gather([self.workers[0].rendezvous.remote()], starting)[0]
        self._gather([w.join.remote(address) for w in self.workers], starting)

    def optimize(self, batch: Batch, targets: Targets, iteration: int) -> dict:
        """Learner.optimize on every rank (the experience shipped once), then rank 0's weights into
        `policy` and `critic`; the statistics, summed over ranks as one process sums them."""
        if not self.workers:
            raise RlhfspecError("the training workers were stopped by an earlier failure; rerun with --resume.")
        when = f"at iteration {iteration}; the iteration was not committed, rerun with --resume to continue from the last checkpoint"
        b, t = self.ray.put(batch), self.ray.put(targets)
        ranks = self._gather([w.optimize.remote(b, t, iteration) for w in self.workers], when)
        start = time.perf_counter()
        load_weights(self.policy, self.critic, self.weights(when))
        # The rank that reached the all-reduces last waited for no other: its time there is the
        # transfer; the others' extra time is waiting for the slowest rank's backward passes.
        reduce = [r.pop("allreduce_s", 0.0) for r in ranks]
        return {**ranks[0], "allreduce_s": min(reduce), "allreduce_wait_s": max(reduce) - min(reduce),
                "weights_back_s": time.perf_counter() - start,
                **{k: max((r[k] for r in ranks if r[k] is not None), default=None) for k in ("optimizer_state_mb", "worker_peak_mb")}}

    def weights(self, when: str = "while sending its weights") -> dict:
        """Rank 0's policy (and critic) tensors, as `learner.weight_tensors` gives them (views of
        the buffer Ray received, to be copied before it goes)."""
        tensors: dict[str, dict] = {}
        for key, t in unpack_weights(*self._gather([self.workers[0].weights.remote()], when)[0]).items():
            model, name = key.split("/", 1)
            tensors.setdefault(model, {})[name] = t
        return tensors

    def state_dict(self) -> tuple[dict, dict]:
        """As Learner.state_dict: the weights from this process's copies (equal to every rank's), the
        scheduler's state from rank 0 and the optimizer states from rank 0 or, sharded, every
        rank's shares merged into the state one optimizer over all the parameters has."""
        ranks = self.workers if self.config.train.shard_optimizer else self.workers[:1]
        parts = self._gather([w.objects.remote() for w in ranks], "while its state was checkpointed")
        objects = parts[0]
        for key in ("optimizer", "critic_optimizer"):
            if key in objects and len(parts) > 1:
                objects[key] = merge_states([p[key] for p in parts])
        return weight_tensors(self.policy, self.critic), objects

    def load_state_dict(self, tensors: dict, objects: dict) -> None:
        load_weights(self.policy, self.critic, tensors)
        t, o = self.ray.put(tensors), self.ray.put(objects)
        self._gather([w.load_state_dict.remote(t, o) for w in self.workers], "while loading the checkpoint")

    def close(self) -> None:
        """Stop the workers (and the Ray cluster, when this object started it)."""
        for w in self.workers:
            self.ray.kill(w, no_restart=True)
        self.workers = []
        if self.owns_cluster:
            self.ray.shutdown()
            self.owns_cluster = False

    def _gather(self, refs: list, when: str) -> list:
        """The calls' results; if any rank failed, stop every worker and raise one sentence naming
        the rank (one that died is named before one whose collective broke because of it)."""
        ray = self.ray
        errors: dict[int, Exception] = {}
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=GRACE_S if errors else None)
            if not ready:
                break  # the rest wait in a collective for a failed rank
            try:
                ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.OutOfMemoryError) as e:
                errors[rank_of[ready[0]]] = e
        if not errors:
            return ray.get(refs)
        self.close()
        starved = sorted(r for r, e in errors.items() if isinstance(e, ray.exceptions.OutOfMemoryError))
        if starved:
            raise RlhfspecError(f"training worker {starved[0]} of {self.size} was stopped by Ray for want of memory {when} "
                                "(fewer train.workers or a smaller train.micro_batch_tokens need less).")
        dead = sorted(r for r, e in errors.items() if isinstance(e, ray.exceptions.RayActorError))
        if dead:
            raise RlhfspecError(f"training worker {dead[0]} of {self.size} died {when}.")
        rank = min(errors)
        cause = errors[rank].cause
        if isinstance(cause, RlhfspecError):
            raise RlhfspecError(str(cause)) from None
        raise RlhfspecError(f"training worker {rank} of {self.size} failed {when}: {type(cause).__name__}: {cause}") from None
