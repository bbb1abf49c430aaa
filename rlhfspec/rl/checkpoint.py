"""Run checkpoints, written atomically (temporary directory, then rename) so a kill never leaves a half one."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def save(run_dir: Path, iteration: int, tensors: dict[str, dict[str, torch.Tensor]], objects: dict, keep: int = 2) -> Path:
    """Write checkpoints/iter-NNNNNN with one safetensors file per entry of `tensors` and the
    pickled `objects` (optimizer and scheduler states, RNG, data position, ...), then point
    checkpoints/latest at it and prune all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{iteration:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    for key, state in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{key}.safetensors"))
    with open(tmp / "state.pkl", "wb") as f:
        pickle.dump(objects, f)
    (tmp / "meta.json").write_text(json.dumps({"iteration": iteration}))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / LATEST)
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-"))
    for old in done[:-keep]:
        shutil.rmtree(old)
    for stray in root.glob(".iter-*"):  # temporaries of a run killed while writing
        shutil.rmtree(stray, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_dir() else None


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    with open(path / "state.pkl", "rb") as f:
        objects = pickle.load(f)
    return tensors, objects
