"""The Python entry point TRL users expect: a config, reward callables, a dataset object; and
settings rejected with one sentence before any model loads."""

import pytest
import torch

from rlhfspec import Config, RlhfspecError, Trainer
from tests.rl.helpers import rl_config


def _config(tmp_path, policy, **overrides):
    return rl_config(tmp_path, policy, **{"generation.num_generations": 2, "generation.max_new_tokens": 6,
                                          "train.iterations": 1, **overrides})


ROWS = [{"messages": [{"role": "user", "content": f"What is {a} + {b} ?"}], "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2)]]


@pytest.mark.parametrize("as_dataset", [False, True])
def test_trainer_takes_reward_callables_and_a_dataset_object(tmp_path, policy, as_dataset):
    seen = {}

    def conversational(prompts, completions, completion_ids, answer, **_):
        seen["prompt"], seen["completion"], seen["answer"] = prompts[0], completions[0], answer[0]
        return [float(len(c[0]["content"])) for c in completions]

    dataset = ROWS
    if as_dataset:
        import datasets

        dataset = datasets.Dataset.from_list(ROWS)
    records = Trainer(_config(tmp_path, policy), reward_funcs=[conversational, "answer_format"], train_dataset=dataset,
                      progress=False, log=lambda m: None).train()
    assert len(records) == 1 and "reward/conversational" in records[0]
    # Chat prompts reach rewards as messages and completions as [{"role": "assistant", "content": ...}], as in TRL.
    assert isinstance(seen["prompt"], list) and seen["completion"][0]["role"] == "assistant"
    assert seen["answer"] in {"3", "7", "4"}


def test_a_module_function_reward_imports_from_the_current_directory(tmp_path, monkeypatch):
    from rlhfspec.rewards.compose import resolve

    (tmp_path / "my_rewards_for_test.py").write_text("def short(prompts, completions, **_):\n    return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert resolve("my_rewards_for_test:short")([], ["a"]) == [1.0]
    with pytest.raises(RlhfspecError, match="looked up in the current directory"):
        resolve("no_such_module_here:f")


@pytest.mark.parametrize("overrides, message", [
    ({"train.learning_rate": -1e-5}, "train.learning_rate is -1e-05; it must be > 0"),
    ({"generation.top_p": 1.5}, "top_p is 1.5"),
    ({"generation.max_new_tokens": 0}, "max_new_tokens is 0"),
    ({"run.wandb": "true"}, "wandb is not installed"),
    ({"data.task": "/nonexistent.jsonl"}, "neither 'arithmetic' nor an existing file"),
    ({"reward.functions": "[no_such_reward]"}, "is not built in"),
    ({"train.workers": 0}, "train.workers is 0; it must be >= 1 (1 trains in this process)"),
    ({"run.device": "tpu"}, "run.device 'tpu' is not auto, cpu, cuda or cuda:N."),
    ({"train.logits_chunk": 0}, "train.logits_chunk is 0; it must be >= 1 (or null: all rows at once)."),
    ({"run.device": "cuda:x"}, "run.device 'cuda:x' is not auto, cpu, cuda or cuda:N."),
    ({"generation.gpus_per_instance": -1}, "generation.gpus_per_instance is -1.0; it must be >= 0"),
    ({"generation.gpus_per_instance": 1}, "generation.gpus_per_instance is 1.0, but only Ray actors reserve GPUs"),
    ({"generation.refresh_targets": "oracle"}, "generation.refresh_targets is 'oracle'; it must be 'teacher' or 'rollout'."),
    ({"generation.refresh_buffer": 0}, "generation.refresh_buffer is 0; it must be at least 1 (iterations of rollouts)."),
    ({"generation.refresh_unroll": "sometimes"}, "generation.refresh_unroll is 'sometimes'; it must be true, false or 'auto'."),
    ({"generation.refresh_trace_every": 0}, "generation.refresh_trace_every is 0; it must be at least 1 (1: every sample keeps its targets)."),
    ({"generation.drafters": "[ngramm]", "generation.speculative": "true"}, "generation.drafters: 'ngramm' is neither a drafter (ngram, draft, eagle, eagle-tree) nor the path"),
    ({"model.dtype": "float16"}, "model.dtype 'float16' is not float32 or bfloat16 (the master weights' precision"),
])
def test_bad_settings_fail_before_the_model_loads(tmp_path, overrides, message):
    # The policy path does not exist: reaching load_model would raise a different error.
    with pytest.raises(RlhfspecError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        Trainer(_config(tmp_path, tmp_path / "no-such-policy", **overrides), progress=False, log=lambda m: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_run_without_a_gpu_is_one_sentence(tmp_path, device):
    with pytest.raises(RlhfspecError, match=rf"^run.device is '{device}', but this torch \(.*\) sees no CUDA GPU; use cpu \(or auto"):
        Trainer(_config(tmp_path, tmp_path / "no-such-policy", **{"run.device": device}), progress=False, log=lambda m: None)


@pytest.mark.parametrize("reward_funcs, message", [
    (lambda prompts, completions, **_: [0.0] * len(completions), "no-such-policy"),  # one function, as TRL takes it: accepted
    ("answer_format", "no-such-policy"),  # one name, not its letters
    ([42], "reward function 42 is neither a function nor a name"),
])
def test_reward_funcs_take_one_function_or_a_list_as_trl_does(tmp_path, reward_funcs, message):
    # Rewards are resolved before the model loads: reaching the missing policy means they were accepted.
    with pytest.raises(RlhfspecError, match=message):
        Trainer(_config(tmp_path, tmp_path / "no-such-policy"), reward_funcs=reward_funcs, progress=False, log=lambda m: None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_load_model_on_a_device_this_torch_lacks_is_one_sentence(tmp_path):
    from rlhfspec import load_model

    with pytest.raises(RlhfspecError, match=r"^device is 'cuda', but this torch \(.*\) sees no CUDA GPU"):
        load_model(tmp_path / "no-such-policy", device="cuda")
    with pytest.raises(RlhfspecError, match=r"^device 'foo' is not auto, cpu, cuda or cuda:N\.$"):
        load_model(tmp_path / "no-such-policy", device="foo")


def test_a_float16_model_on_the_batch_invariant_engine_is_one_sentence(tiny_checkpoint):
    from rlhfspec import SamplingParams, generate, load_model

    model, _ = load_model(tiny_checkpoint("llama"), dtype="float16", tokenizer=False)
    with pytest.raises(RlhfspecError, match="the batch-invariant engine runs float32 and bfloat16 models, and this one is float16"):
        generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=2))
    assert len(generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=2), batch_invariant=False)[0].token_ids) == 2


def test_public_api_exports_the_trainer_and_its_config():
    assert callable(Trainer)
    c = Config()
    # Batch-invariant generation where it has been verified (the CPU), the fast forward on a GPU.
    assert c.run.device == "auto" and c.generation.batch_invariant is None
    assert c.generation.engine_spec("cpu").batch_invariant and not c.generation.engine_spec("cuda").batch_invariant
    assert (c.generation.actor_gpus("cpu"), c.generation.actor_gpus("cuda:1")) == (0.0, 1.0)
    assert c.device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_generate_rejects_text_where_token_ids_belong(tiny_checkpoint):
    from rlhfspec import generate, load_model

    model, _ = load_model(tiny_checkpoint("llama"), tokenizer=False)
    with pytest.raises(RlhfspecError, match="prompt 0 is str 'text', not a list of token ids"):
        generate(model, ["text"])


def test_an_empty_prompt_is_refused_before_the_chat_template_hides_it(tmp_path):
    from rlhfspec.data.chat import encode_prompt
    from tests.rl.helpers import tiny_policy_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_policy_dir(tmp_path / "p")))
    with pytest.raises(RlhfspecError, match="the prompt is empty"):
        encode_prompt(tok, "   ")
    with pytest.raises(RlhfspecError, match="no message with any content"):
        encode_prompt(tok, [{"role": "user", "content": ""}])
    with pytest.raises(RlhfspecError, match=r"a prompt is text or a list of chat messages, not a value of type int \('5'\)"):
        encode_prompt(tok, 5)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(RlhfspecError, match=r"chat=False \(generate --raw\) encodes a prompt's text as it is"):
        encode_prompt(tok, messages, chat=False)
    tok.chat_template = None
    with pytest.raises(RlhfspecError, match="the tokenizer has no chat template"):
        encode_prompt(tok, messages)


def test_a_bad_drafter_path_says_it_is_the_drafter(tiny_checkpoint):
    from rlhfspec import SamplingParams, generate, load_model

    model, _ = load_model(tiny_checkpoint("llama"), tokenizer=False)
    with pytest.raises(RlhfspecError, match=r"^drafter /nonexistent/draft: "):
        generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=2), drafter="/nonexistent/draft")
