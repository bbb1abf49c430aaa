"""Training in bfloat16 mixed precision: autocast over float32 master weights, chosen by the hardware
unless train.dtype says, with the rollout's logprobs corrected for the precision gap."""

import pytest
import torch

from rlhfspec.engine.sampling import SamplingParams
from rlhfspec.errors import RlhfspecError
from rlhfspec.models.loader import load_model
from rlhfspec.models.rounding import engine_copy
from rlhfspec.rl import checkpoint as ckpt
from rlhfspec.rl.config import TrainConfig
from rlhfspec.rl.logprobs import Batch, all_logprobs, completion_logprobs
from rlhfspec.rl.trainer import Trainer
from tests.rl.test_trainer import config


def test_bfloat16_autocast_gradient_points_where_the_float32_gradient_does(policy):
    model, _ = load_model(policy, dtype="float32")
    model.train().requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    batch = Batch([torch.randint(0, 40, (5,), generator=g).tolist() for _ in range(4)],
                  [torch.randint(0, 40, (7,), generator=g).tolist() for _ in range(4)])
    params = SamplingParams(temperature=1.0)
    grads = {}
    for dtype in ("float32", "bfloat16"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            lp, mask = completion_logprobs(model, batch, [0, 1, 2, 3], params)
        assert lp.dtype == torch.float32  # the loss is formed in float32
        (lp * mask).sum().backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    cos = torch.nn.functional.cosine_similarity(grads["float32"], grads["bfloat16"], dim=0)
    assert cos > 0.99
    assert not torch.equal(grads["float32"], grads["bfloat16"])  # autocast did take effect


def test_no_grad_forwards_under_autocast_run_in_bfloat16_too(policy):
    """Old and reference logprobs (no grad) must see the same precision as the trained forward,
    or the first step's ratio is not 1: the packed inference kernels would bypass autocast."""
    model, _ = load_model(policy, dtype="float32")
    model.train().requires_grad_(True)
    # Shortest first, as all_logprobs orders its micro-batch: the same rows in the same positions of
    # the same calls, so the two forwards are equal by construction.
    batch = Batch([[1, 2, 3, 4]] * 2, [[8, 9], [5, 6, 7]])
    params = SamplingParams(temperature=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        no_grad = all_logprobs(model, batch, params, 4096)
        with_grad, mask = completion_logprobs(model, batch, [0, 1], params)
    assert torch.equal(no_grad * mask, with_grad.detach() * mask)
    assert not torch.equal(no_grad, all_logprobs(model, batch, params, 4096))  # and differs from float32


def test_train_dtype_defaults_to_the_hardware(monkeypatch):
    import rlhfspec.models.hardware as hw

    monkeypatch.setattr(hw, "native_bf16", lambda: True)
    assert TrainConfig().compute_dtype() == "bfloat16"
    monkeypatch.setattr(hw, "native_bf16", lambda: False)
    assert TrainConfig().compute_dtype() == "float32"
    assert TrainConfig().compute_dtype("cuda:0") == "bfloat16"
    assert TrainConfig(dtype="float32").compute_dtype("cuda") == "float32"


def test_a_bad_train_dtype_is_one_sentence(tmp_path, policy):
    with pytest.raises(RlhfspecError, match="train.dtype 'float16' is not float32 or bfloat16"):
        config(tmp_path, policy, **{"train.dtype": "float16"}).validate()


def test_bfloat16_training_keeps_float32_weights_and_recomputes_old_logprobs(tmp_path, policy, monkeypatch):
    import rlhfspec.rl.experience as experience

    recomputed = []
    original = experience.all_logprobs
    monkeypatch.setattr(experience, "all_logprobs", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    cfg = config(tmp_path, policy, **{"train.dtype": "bfloat16", "train.iterations": 2})
    lines = []
    trainer = Trainer(cfg, progress=False, log=lines.append)
    records = trainer.train()
    assert "training on cpu in bfloat16 (autocast over float32 weights)" in lines
    # The float32 engine's logprobs are not the bfloat16 trainer's: old logprobs are recomputed
    # by the trainer (and truncated importance weights correct the rollout for the gap).
    assert trainer.verified_logprobs is False
    # One optimizer step per iteration: the training forward's own logprobs are the old ones, and
    # it measures the gap every iteration; nothing is recomputed.
    assert recomputed == []
    assert all(r["rollout_trainer_logprob_gap_max"] > 1e-3 for r in records)
    assert all(r["rollout_trainer_logprob_diff"] == r["rollout_trainer_logprob_gap_max"] for r in records)
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    tensors, _ = ckpt.load(ckpt.latest(tmp_path / "run"))
    assert all(t.dtype == torch.float32 for t in tensors["policy"].values())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # Two steps per iteration: the second step's policy is not the behaviour policy, so the old
    # logprobs are recomputed; iteration 0's check already computed them, so only iteration 1 does.
    recomputed.clear()
    cfg = config(tmp_path, policy, **{"train.dtype": "bfloat16", "train.iterations": 2, "train.mini_batches": 2,
                                      "run.output_dir": tmp_path / "two_steps"})
    records = Trainer(cfg, progress=False, log=lines.append).train()
    assert len(recomputed) == 1
    assert records[0]["rollout_trainer_logprob_gap_max"] > 1e-3 and "rollout_trainer_logprob_gap_max" not in records[1]


def test_a_bfloat16_engine_holds_the_keyed_stochastic_rounding_of_the_policy_and_a_resume_rebuilds_it(tmp_path, policy):
    bf16 = {"train.dtype": "float32", "generation.dtype": "bfloat16", "generation.rounding": "stochastic"}
    cfg = config(tmp_path, policy, **bf16, **{"train.iterations": 2})
    trainer = Trainer(cfg, progress=False, log=lambda m: None)
    trainer.train()
    engine = dict(trainer.engine.named_parameters())
    state = trainer.policy.state_dict()  # what a Ray sync rounds, by the same names
    rounded = {k: engine_copy(k, state[k], torch.bfloat16, "stochastic", (cfg.train.seed, 2)) for k in engine}
    assert all(torch.equal(engine[k], rounded[k]) for k in engine)  # the copy that generates iteration 2
    assert any(not torch.equal(engine[k], state[k].to(torch.bfloat16)) for k in engine)  # not round-to-nearest
    more = config(tmp_path, policy, **bf16, **{"train.iterations": 3})
    resumed = Trainer(more, resume=True, progress=False, log=lambda m: None)
    assert all(torch.equal(p, engine[k]) for k, p in resumed.engine.named_parameters())


def test_an_unknown_rounding_is_one_sentence(tmp_path, policy):
    with pytest.raises(RlhfspecError, match="generation.rounding 'up' is not one of nearest, stochastic."):
        config(tmp_path, policy, **{"generation.rounding": "up"}).validate()
