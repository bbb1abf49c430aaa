"""The roofline: bytes over bandwidth at small batch, FLOPs over peak at large, TP splits both; tables round-trip."""

import pytest

from rlhfspec.sim import Roofline, RooflineCost, Shape, TableCost, accelerator, model_config
from rlhfspec.sim.hardware import ACCELERATORS


def roof(model="8B", gpu="H100", tp=1, overhead_s=0.0):
    return Roofline(accelerator(gpu), Shape.of(model_config(model)), tp, overhead_s=overhead_s)


def test_decode_at_batch_one_reads_the_weights_once():
    r = roof()
    c = model_config("8B")
    weights = (c.num_params - c.vocab_size * c.hidden_size) * 2
    assert r.forward(1, 1, 0) == pytest.approx(weights / (3.35e12 * r.mem_eff), rel=1e-3)


def test_large_batches_are_bound_by_flops_and_verification_costs_more_there():
    r = roof()
    small = r.forward(1, 9, 512) / r.forward(1, 1, 512)
    large = r.forward(256, 9, 512) / r.forward(256, 1, 512)
    assert small < 1.01  # memory-bound: 9 tokens per row cost what 1 does
    assert large > 3  # compute-bound: close to 9x
    flops = 256 * 9 * (r.shape.flops_per_token + r.shape.attention_flops_per_pair * (512 + 5))
    assert r.forward(256, 9, 512) == pytest.approx(flops / (989e12 * r.flop_eff))


def test_tensor_parallel_divides_the_work_and_adds_all_reduces():
    one, eight = roof("70B", tp=1), roof("70B", tp=8)
    assert eight.forward(1, 1, 0) == pytest.approx(one.forward(1, 1, 0) / 8 + 2 * 80 * (eight.allreduce_latency_s + 2 * 7 / 8 * 8192 * 2 / 450e9), rel=1e-6)


def test_every_accelerator_has_its_spec_sheet_figures():
    assert set(ACCELERATORS) == {"A100", "A100-40GB", "H100", "H200", "B200"}
    assert roof(gpu="H200").forward(1, 1, 0) < roof(gpu="H100").forward(1, 1, 0) < roof(gpu="A100").forward(1, 1, 0)


def test_the_selector_profile_is_the_roofline_at_the_profile_context():
    cost = RooflineCost(roof(overhead_s=1e-3), {"draft": roof("0.5B", overhead_s=1e-3)})
    model = cost.profile(max_batch=100, max_n=8)
    assert model.verify(64, 5) == pytest.approx(cost.verify(64, 5, 512))
    assert model.verify(100, 9) == pytest.approx(cost.verify(100, 9, 512))
    assert model.draft("draft", 32, 8) == pytest.approx(cost.draft("draft", 32, 8, 512))


def test_table_json_round_trip(tmp_path):
    cost = TableCost({(1, 1): 0.01, (8, 1): 0.02, (1, 5): 0.015, (8, 5): 0.04}, {"draft": {(1, 1): 0.001, (8, 8): 0.01}},
                     ngram_seconds_per_row_token=3e-5, kv_bytes_per_token=100.0)
    path = tmp_path / "table.json"
    import json

    path.write_text(json.dumps(cost.to_json()))
    back = TableCost.load(path)
    assert back.verify_table == cost.verify_table and back.drafts == cost.drafts
    assert back.ngram_seconds_per_row_token == pytest.approx(3e-5) and back.kv_bytes_per_token == 100.0
    assert "ngram" not in back.profile(8, 4).draft_tables  # the engine learns the n-gram drafter's cost online


def test_an_eagle_head_drafts_with_one_layer_of_the_policy():
    from rlhfspec.sim.ablation import EAGLE_DRAFT_VOCAB, SimConfig, build, eagle_head

    policy = model_config("8B")
    head = eagle_head(policy)
    assert (head.num_layers, head.hidden_size, head.vocab_size) == (1, policy.hidden_size, EAGLE_DRAFT_VOCAB)
    cost, _, _, desc = build(SimConfig(model="8B", prompts=2, samples=2, lengths="64", acceptance="eagle=0.7;ngram=0.3"))
    assert set(cost.draft_models) == {"eagle"} and "eagle head" in desc
    # One draft token reads one layer and a 32k-row output layer: a small fraction of the policy's forward.
    body = cost.draft("eagle", 1, 1, 512) - cost.policy.overhead_s
    assert 0 < body < 0.1 * (cost.verify(1, 1, 512) - cost.policy.overhead_s)
