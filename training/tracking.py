"""What a training run records so it can be followed, repeated and audited.

Per step: loss and learning rate, in `steps.csv` (exact values, one row per optimiser
step) and in TensorBoard event files (`tensorboard/`, beside the per-epoch scalars). Per
run: the code (git commit when the code runs from a checkout, ichnode and library
versions) and the data (SHA-256 of each split list), which also go into the checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import math
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["StepLog", "code_record", "json_safe", "split_hashes"]

STEP_FIELDS = ["step", "epoch", "step_in_epoch", "loss", "lr"]
LIBRARIES = ("ichnode", "torch", "torchvision", "timm", "effdet", "numpy", "tensorboard")


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None, so json.dumps(..., allow_nan=False) accepts it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _git(folder: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def code_record() -> dict[str, Any]:
    """The code that runs: git commit and whether the checkout has uncommitted changes
    (None when not run from a git checkout), Python and library versions."""
    folder = Path(__file__).resolve().parent
    commit = _git(folder, "rev-parse", "HEAD")
    status = _git(folder, "status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status), "versions": versions}


def split_hashes(prepared: Path) -> dict[str, str]:
    """SHA-256 of each split list of a prepared folder: which slices, labels and order."""
    hashes = {}
    for path in sorted((Path(prepared) / "splits").glob("*.csv")):
        hashes[path.stem] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


class StepLog:
    """Per-step loss and learning rate to steps.csv and TensorBoard; per-epoch scalars to
    TensorBoard. Opened at `step` (the steps already done): rows and events of later
    steps, left by a run that stopped after its last saved state, are dropped, since the
    resumed run does those steps again."""

    def __init__(self, folder: Path, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.csv_path = folder / "steps.csv"
        kept = []
        if step and self.csv_path.is_file():
            with open(self.csv_path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
        with open(self.csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=STEP_FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self.handle = open(self.csv_path, "a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=STEP_FIELDS)
        # purge_step: TensorBoard drops what an earlier run logged from this step on.
        self.board = SummaryWriter(str(folder / "tensorboard"), purge_step=step + 1 if step else None)

    def step(self, step: int, epoch: int, step_in_epoch: int, loss: float, lr: float) -> None:
        # repr: the shortest text that reads back as the same float, so runs compare exactly.
        self.writer.writerow({"step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "loss": repr(loss),
                              "lr": repr(lr)})
        self.handle.flush()  # a row per step, as it happens (tail -f, and a run stopped mid-epoch)
        self.board.add_scalar("train/loss", loss, step)
        self.board.add_scalar("train/lr", lr, step)

    def epoch(self, step: int, record: dict[str, Any]) -> None:
        for key in ("train_loss", "val_loss", "val_roc_auc"):
            value = record.get(key)
            if value is not None and math.isfinite(value):
                self.board.add_scalar(f"epoch/{key}", value, step)
        self.flush()

    def flush(self) -> None:
        self.handle.flush()
        self.board.flush()

    def close(self) -> None:
        self.handle.close()
        self.board.close()
