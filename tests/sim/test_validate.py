"""The validation path on a tiny model: a real run's workload trace (lengths and acceptance, no
timings) and a measured step-time table in, a predicted wall time out."""

import dataclasses

import pytest

from rlhfspec import SamplingParams, load_model
from rlhfspec.bench.rollout import workload_trace
from rlhfspec.bench.sim_validate import TRACE_KEYS, predict, row, step_times
from rlhfspec.engine.drafters import NgramDrafter
from rlhfspec.engine.report import time_split
from rlhfspec.engine.spec import Adaptive, EngineSpec, Ngram, Static
from rlhfspec.rollout.generate import run_generation
from rlhfspec.sim import Cluster
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from tests.conftest import tiny_hf_model

    path = tmp_path_factory.mktemp("tiny")
    tiny_hf_model("llama").save_pretrained(path)
    policy, _ = load_model(path, dtype="float32")
    # The fast kernels: placement invariance is not what this tests, and they need no first-use checks.
    table = step_times(policy, [NgramDrafter()], batches=(1, 2, 4, 8), ns=(2,), repeats=1, prompt_len=8, batch_invariant=False)
    return policy, table


@pytest.mark.parametrize("real, strategy", [(None, None), (Static("ngram", 2), Static("ngram", 2)), (Static("ngram", 2), Adaptive(4))])
def test_a_run_is_predicted_from_its_lengths_and_acceptance_alone(measured, real, strategy):
    policy, table = measured
    prompts = [p for p in random_prompts(4, policy.config.vocab_size, 3, 10, seed=1) for _ in range(3)]  # groups share prefills
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    spec = EngineSpec((Ngram(),) if real else (), real, 8, batch_invariant=False)
    gen = run_generation(spec, prompts, params, seed=3, model=policy)
    records = [r for st in gen.stats for r in st.records]
    trace = workload_trace(prompts, gen.outputs, records)
    assert tuple(trace) == TRACE_KEYS
    cluster = Cluster(1, 8)
    sim = predict(trace, table, cluster, strategy, 24, ["ngram"], seed=0)
    assert sim.tokens == gen.tokens and sim.makespan_s > 0
    # Beside the prediction, where the seconds went in the real run and in the simulated one.
    split = row("rollout", "x", gen.seconds, {"steps": sim}, time_split(gen.stats))["split"]
    m, p = split["measured"], split["steps"]
    assert m["steps"] == len(records) and p["steps"] == sim.steps and m["prefill_s"] > 0 and p["prefill_s"] > 0
    assert m["speculative_steps"] == sum(1 for r in records if r.drafter)
    if strategy is None or isinstance(strategy, Static):  # the adaptive selector may or may not draft on this machine's table
        assert (p["speculative_steps"] > 0) == (strategy is not None)
    assert m["unrecorded_s"] >= 0 and p["unrecorded_s"] == pytest.approx(0, abs=1e-6)  # a simulated instance only steps and prefills
    if real is None:  # plain decoding: the same lengths take the same steps
        assert m["steps"] == p["steps"]
    # The prediction does not move when every timing of the real run does.
    for r in records:
        r.verify_s, r.draft_s, r.decide_s = 1e3 * r.verify_s, 1e3 * r.draft_s, 1.0
    scrambled = workload_trace(prompts, gen.outputs, records)
    assert scrambled == trace
    again = predict(scrambled, table, cluster, strategy, 24, ["ngram"], seed=0)
    assert again.makespan_s == sim.makespan_s
    out = row("rollout", "x", gen.seconds, {"steps": sim})
    assert set(out) == {"run", "policy", "measured_s", "steps_s", "steps_error", "steps_moves"}


def test_a_trace_with_timings_is_refused(measured):
    _, table = measured
    with pytest.raises(ValueError, match="wall_s"):
        predict({"prompt_lens": [4], "lengths": [5], "acceptance": {}, "wall_s": 1.0}, table, Cluster(1, 1), None, 8, [])


def test_the_step_table_covers_plain_and_speculative_steps(measured):
    _, table = measured
    assert {(b, q) for b in (1, 2, 4, 8) for q in (1, 3)} == set(table.verify_table)  # plain, and verifying n = 2
    assert table.prefill_seconds_per_token > 0 and table.ngram_seconds_per_row_token > 0
    assert dataclasses.asdict(table)["source"] == "whole engine steps"


def test_gpu_benches_say_what_they_cannot_run():
    from rlhfspec.bench.rollout import RolloutBenchConfig
    from rlhfspec.bench.sim_validate import SimValidateConfig
    from rlhfspec.engine.profile import invariant_for
    from rlhfspec.errors import RlhfspecError

    with pytest.raises(RlhfspecError, match="add --no-realloc"):
        SimValidateConfig(device="cuda")
    with pytest.raises(RlhfspecError, match="one in-process instance"):
        RolloutBenchConfig(device="cuda", backend="ray")
    assert SimValidateConfig(device="cuda", realloc=False).device == "cuda"
    # The selector's profile and the benches time the batch-invariant forward on the CPU only.
    assert invariant_for("cpu") and not invariant_for("cuda")
