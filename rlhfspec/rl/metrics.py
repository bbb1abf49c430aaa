"""Per-iteration metrics: JSONL always, TensorBoard and wandb when available and enabled."""

from __future__ import annotations

import json
from pathlib import Path

from rlhfspec.errors import RlhfspecError


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: bool = False, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RlhfspecError("run.tensorboard is true but tensorboard is not installed; pip install tensorboard (or set run.tensorboard false).") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.wandb = None
        if wandb:
            try:
                import wandb as wb
            except ImportError:
                raise RlhfspecError("run.wandb is true but wandb is not installed; pip install 'rlhfspec[wandb]' (or set run.wandb false).") from None
            self.wandb = wb.init(project="rlhfspec", name=Path(run_dir).name, dir=str(run_dir), config=config or {})

    def truncate(self, before_iteration: int) -> None:
        """Drop records of iterations a resumed run will redo."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["iteration"] < before_iteration]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["iteration"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "iteration":
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
