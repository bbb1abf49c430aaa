"""Run checkpoints, written atomically (temporary directory, then rename) so a kill never leaves a half one.

Tensors go to safetensors, everything else to JSON; nothing is ever unpickled, so opening a run
directory someone shared cannot run their code. `state.json` holds the trainer's objects
(optimizer and scheduler states, RNG, data position, the rollout's drafter and strategy states, the draft refresher's) with each tensor replaced
by a reference into `state.safetensors`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhfspec.errors import RlhfspecError

LATEST = "latest"
STATE = "state"  # state.json + state.safetensors
FORMAT = 2  # 1: the pickled state.pkl of rlhfspec before this format


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])


def to_json(obj, tensors: dict[str, torch.Tensor], path: str = "s"):
    """A JSON-able copy of obj (dicts, lists, tuples, numbers, strings, None, tensors); tensors
    move into `tensors` under their path and leave {"__tensor__": path} behind. Dicts with
    non-string keys and tuples are tagged so `from_json` restores them exactly."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous().cpu().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj:
            return {k: to_json(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[to_json(k, tensors, f"{path}.k{i}"), to_json(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [to_json(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise RlhfspecError(f"checkpoint state at {path} is a {type(obj).__name__}, which has no safe (non-pickle) form.")


def from_json(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of `to_json`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {from_json(k, tensors): from_json(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(from_json(v, tensors) for v in obj["__tuple__"])
        return {k: from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v, tensors) for v in obj]
    return obj


def save(run_dir: Path, iteration: int, tensors: dict[str, dict[str, torch.Tensor]], objects: dict, keep: int = 2) -> Path:
    """Write checkpoints/iter-NNNNNN with one safetensors file per entry of `tensors` and the
    trainer's `objects` as state.json + state.safetensors, then point checkpoints/latest at it
    and prune all but the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{iteration:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    for key, state in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / f"{key}.safetensors"))
    state_tensors: dict[str, torch.Tensor] = {}
    (tmp / f"{STATE}.json").write_text(json.dumps(to_json(objects, state_tensors)))
    save_file(state_tensors, str(tmp / f"{STATE}.safetensors"))
    (tmp / "meta.json").write_text(json.dumps({"iteration": iteration, "format": FORMAT}))
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
    """The newest checkpoint directory. Each appears whole (renamed from its temporary), so the
    newest is read from the directories themselves, not from the `latest` pointer (kept for people
    and tools), which a kill between the rename and the pointer's update leaves one behind."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-"))
    return done[-1] if done else None


def check_loadable(run_dir: Path) -> Path:
    """The run's latest checkpoint, or a clear error if there is none or it cannot be read safely."""
    path = latest(run_dir)
    if path is None:
        raise RlhfspecError(f"--resume: {run_dir} has no checkpoint to resume from.")
    _check_format(path)
    return path


def load(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensor dicts by file stem, the trainer's objects) of a checkpoint directory."""
    path = Path(path)
    _check_format(path)
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors") if p.stem != STATE}
    state_file = path / f"{STATE}.safetensors"
    state_tensors = load_file(str(state_file)) if state_file.is_file() else {}
    return tensors, from_json(json.loads((path / f"{STATE}.json").read_text()), state_tensors)


def _check_format(path: Path) -> None:
    if any(path.glob("*.pkl")) or any(path.glob("*.pickle")):
        raise RlhfspecError(
            f"checkpoint {path} holds a pickle (an older rlhfspec's state.pkl); rlhfspec never unpickles files, since "
            f"that can run code. If you trust where it came from, convert it once with: "
            f"python -m rlhfspec.rl.checkpoint --convert-trusted-pickle {path}"
        )
    if not (path / f"{STATE}.json").is_file():
        raise RlhfspecError(f"checkpoint {path} has no {STATE}.json; it is incomplete or not an rlhfspec checkpoint.")


def convert_trusted_pickle(path: Path) -> None:
    """Rewrite an older checkpoint's state.pkl as state.json + state.safetensors (unpickles it once:
    only for checkpoints whose origin you trust)."""
    import pickle

    path = Path(path)
    source = path / "state.pkl"
    if not source.is_file():
        raise RlhfspecError(f"{path} has no state.pkl to convert.")
    with open(source, "rb") as f:
        objects = pickle.load(f)  # noqa: S301 - the explicit, trusted conversion the error message offers
    state_tensors: dict[str, torch.Tensor] = {}
    (path / f"{STATE}.json").write_text(json.dumps(to_json(objects, state_tensors)))
    save_file(state_tensors, str(path / f"{STATE}.safetensors"))
    source.unlink()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Convert an older rlhfspec checkpoint's pickled state (trusted sources only).")
    parser.add_argument("--convert-trusted-pickle", type=Path, required=True, metavar="CHECKPOINT_DIR")
    convert_trusted_pickle(parser.parse_args().convert_trusted_pickle)
