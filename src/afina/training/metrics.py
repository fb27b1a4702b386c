"""Where training metrics go: a JSONL file in the run directory, TensorBoard when installed, and a
loss-curve PNG at the end of the run."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, split: str, step: int, **values: float) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"{split}/{key}", value, step)

    def event(self, kind: str, step: int, message: str, **details) -> None:
        """Something the run changed or decided on its own (out-of-memory recovery, a stop)."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"split": "event", "step": step, "kind": kind, "message": message, **details}) + "\n")

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss_curves(metrics_path: Path, target: Path) -> Path | None:
    """Training and validation loss against optimizer step, drawn to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r["split"] == "train" and "loss" in r]
    valid = [(r["step"], r["loss"]) for r in rows if r["split"] == "validation" and "loss" in r]
    if not train and not valid:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="training loss", linewidth=1)
    if valid:
        axis.plot(*zip(*valid), label="validation loss", marker="o")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (assistant tokens)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
