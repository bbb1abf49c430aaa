"""Our decoder's logits equal transformers' own implementation of the same checkpoint."""

import pytest
import torch

from rlhfspec import load_model
from tests.conftest import ARCHS, random_prompts, tiny_hf_model
from tests.models.helpers import engine_logits, hf_logits


def _sequences(vocab: int, seed: int = 0):
    prompts = random_prompts(4, vocab, 3, 17, seed=seed)
    continuations = random_prompts(4, vocab, 32, 32, seed=seed + 1)
    return prompts, continuations


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp32_logits_equal_transformers_prefill_and_32_decode_steps(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    ours, _ = load_model(path, dtype="float32")
    ref = tiny_hf_model(arch)
    prompts, conts = _sequences(ours.config.vocab_size)
    got = engine_logits(ours, prompts, conts)
    want = hf_logits(ref, [p + c for p, c in zip(prompts, conts)])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_ragged_chunks_through_the_cache_equal_transformers(arch, tiny_checkpoint):
    """Samples appending different numbers of tokens in one forward (what verification does)."""
    ours, _ = load_model(tiny_checkpoint(arch), dtype="float32")
    ref = tiny_hf_model(arch)
    prompts, conts = _sequences(ours.config.vocab_size, seed=3)
    chunks = [[1, 3, 2], [4], [2, 1], [1, 5, 1, 1]]
    got = engine_logits(ours, prompts, conts, chunks=chunks)
    want = hf_logits(ref, [p + c for p, c in zip(prompts, conts)])
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_bf16_logits_within_bf16_noise_of_transformers_bf16(arch, tiny_checkpoint):
    """Tolerance: our bf16 logits may differ from transformers' bf16 logits by at most three times
    transformers' own bf16 error (against its float32 logits), plus 0.02."""
    path = tiny_checkpoint(arch)
    ours, _ = load_model(path, dtype="bfloat16")
    ref32 = tiny_hf_model(arch)
    ref16 = tiny_hf_model(arch, dtype=torch.bfloat16)
    prompts, conts = _sequences(ours.config.vocab_size, seed=5)
    seqs = [p + c for p, c in zip(prompts, conts)]
    got = engine_logits(ours, prompts, conts)
    for g, w16, w32 in zip(got, hf_logits(ref16, seqs), hf_logits(ref32, seqs)):
        noise = (w16 - w32).abs().max().item()
        assert (g - w16).abs().max().item() <= 3 * noise + 0.02


def test_training_forward_equals_engine_forward(tiny_checkpoint):
    """The trainer's padded forward (DenseAttention) and the engine's cached forward agree."""
    from rlhfspec.models.attention import DenseAttention

    model, _ = load_model(tiny_checkpoint("qwen2"), dtype="float32")
    prompts, conts = _sequences(model.config.vocab_size, seed=7)
    seqs = [p + c for p, c in zip(prompts, conts)]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])  # left padding
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    model.ensure_positions(width)
    att = DenseAttention(mask, model.config.num_heads, model.config.num_kv_heads)
    with torch.no_grad():
        dense = model.logits(model(ids.reshape(-1), att.positions, att)).view(len(seqs), width, -1)
    cached = engine_logits(model, prompts, conts)
    for i, s in enumerate(seqs):
        assert (dense[i, width - len(s) :] - cached[i]).abs().max().item() <= 1e-4


def test_a_forward_over_scattered_slots_equals_transformers(tiny_checkpoint):
    """Drafters run forwards over a subset of slots; those read the rows they just wrote."""
    from rlhfspec.models.kv_cache import KVCache

    model, _ = load_model(tiny_checkpoint("llama"), dtype="float32")
    ref = tiny_hf_model("llama")
    prompts = random_prompts(4, model.config.vocab_size, 3, 10, seed=1)
    cache = KVCache(model.config, 4, 32, torch.float32)
    model.ensure_positions(32)
    with torch.inference_mode():
        lens = [len(p) for p in prompts]
        att = cache.attend([0, 1, 2, 3], lens)
        model(torch.tensor(sum(prompts, [])), att.positions, att)
        cache.advance([0, 1, 2, 3], lens)
        slots, extra = [0, 2, 3], [[7, 8], [9], [10, 11]]
        att = cache.attend(slots, [len(e) for e in extra])
        logits = model.logits(model(torch.tensor(sum(extra, [])), att.positions, att))
    want = hf_logits(ref, [prompts[s] + e for s, e in zip(slots, extra)])
    got = logits.split([len(e) for e in extra])
    for g, w, e in zip(got, want, extra):
        assert (g - w[-len(e):]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_bfloat16_training_attention_equals_the_fused_kernel(side, monkeypatch):
    """On the CPU in bfloat16 the padded attention runs as plain products (attention.MATH_ATTENTION_ELEMENTS);
    it computes what torch's fused kernel computes, padding and GQA included, forward and backward,
    to bfloat16's rounding."""
    import rlhfspec.models.attention as attention

    torch.manual_seed(0)
    b, t, hq, hkv, d = 3, 11, 6, 2, 16
    lens = [11, 7, 4]
    pad = [[0] * (t - n) + [1] * n if side == "left" else [1] * n + [0] * (t - n) for n in lens]
    att = attention.DenseAttention(torch.tensor(pad), hq, hkv)
    qkv = [torch.randn(b * t, h, d, requires_grad=True) for h in (hq, hkv, hkv)]
    out_grad = torch.randn(b * t, hq * d)
    valid = torch.tensor(pad).bool().reshape(-1)
    results = {}
    for name, cap in (("math", attention.MATH_ATTENTION_ELEMENTS), ("fused", 0)):
        monkeypatch.setattr(attention, "MATH_ATTENTION_ELEMENTS", cap)
        att._bias = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = att(0, *qkv)
        grads = torch.autograd.grad(out.float(), qkv, out_grad * valid[:, None])
        results[name] = (out.float()[valid], [g.reshape(b * t, -1)[valid] for g in grads])
    (out_math, g_math), (out_fused, g_fused) = results["math"], results["fused"]
    assert (out_math - out_fused).abs().max().item() < 0.03  # bfloat16 rounds at 2^-8 relative
    for gm, gf in zip(g_math, g_fused):
        assert (gm - gf).abs().max().item() < 0.05 * gf.abs().max().item()


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2"])
def test_training_gradients_equal_transformers_the_pad_tokens_embedding_row_included(arch, tiny_checkpoint):
    """transformers builds the embedding with padding_idx = config.pad_token_id, so that row gets no
    gradient from the inputs (with tied weights, only the output layer's); every gradient of a
    training forward over inputs holding the pad token equals transformers' to float32 rounding."""
    from rlhfspec.models.attention import DenseAttention
    from rlhfspec.models.checkpoint import from_hf

    ours, _ = load_model(tiny_checkpoint(arch), dtype="float32")
    ref = tiny_hf_model(arch)
    pad = ours.config.pad_token_id
    assert pad == ref.config.pad_token_id == 0
    seqs = torch.tensor(random_prompts(2, ours.config.vocab_size, 12, 12, seed=9))
    seqs[:, 3] = seqs[1, 7] = pad  # the pad token as an input, where the embedding's padding_idx bites
    weights = torch.randn(*seqs.shape, ours.config.vocab_size, generator=torch.Generator().manual_seed(0))
    ours.train().requires_grad_(True)
    ours.ensure_positions(seqs.shape[1])
    att = DenseAttention(torch.ones_like(seqs), ours.config.num_heads, ours.config.num_kv_heads)
    (ours.logits(ours(seqs.reshape(-1), att.positions, att)).view(*weights.shape) * weights).sum().backward()
    (ref(input_ids=seqs).logits * weights).sum().backward()
    want = from_hf(ours.config, {k: p.grad for k, p in ref.named_parameters()}, "transformers' gradients")
    for name, p in ours.named_parameters():
        assert (p.grad - want[name]).abs().max().item() <= 1e-4 * want[name].abs().max().item(), name
    embed = ours.embed.weight.grad[pad]
    assert (embed == 0).all() if ours.lm_head is not None else embed.abs().max() > 0
