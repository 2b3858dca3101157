"""Training runs an ML engineer can rely on: resumes that repeat the uninterrupted run,
augmentation seeded per slice, strict metrics files, TensorBoard events, and a record of
the run in the experiment and the checkpoint. All on synthetic slices (tests/trainrun.py)."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import signal
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from node.errors import ConfigError, DataError
from tests.peers import wait_for
from tests.trainrun import write_train_config
from training.datasets import CachedSlices, EpochOrder
from training.model.checkpoint import default_model_config, load_checkpoint
from training.train import learning_rate, load_train_config, train


def _steps(folder: Path) -> list[dict]:
    with open(folder / "steps.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _strict_json(path: Path):
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _without_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


def test_resume_after_sigterm_mid_epoch_repeats_the_uninterrupted_run(
        reference_run: Path, training_prepared: Path, tmp_path: Path) -> None:
    config_path = write_train_config(tmp_path / "train.toml", training_prepared, tmp_path / "experiments", "stopped")
    folder = tmp_path / "experiments" / "stopped"
    command = [sys.executable, "-m", "node.cli", "train", "--config", str(config_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # SIGTERM as soon as the first step is logged: the run is then in its first epoch.
        wait_for(lambda: (folder / "steps.csv").is_file() and len(_steps(folder)) >= 1, timeout=300,
                 what="the first training step")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err
    assert "training stopped by SIGTERM after step" in err and "--resume" in err
    assert "\r" not in err and "batch/s" not in err  # no progress bar in a log file
    stopped = len(_steps(folder))
    assert 1 <= stopped < 4, "the run was to stop inside its first epoch of 4 steps"
    assert (folder / "state" / f"step-{stopped:09d}.pt").is_file()

    result = train(load_train_config(config_path), resume=True, progress=False)

    reference = _steps(reference_run)
    assert _steps(folder) == reference  # every step's loss and learning rate, exactly
    assert len(reference) == 8
    assert _without_times(result.history) == _without_times(_strict_json(reference_run / "metrics.json")["history"])
    resumed, uninterrupted = _weights(folder / "model.pt"), _weights(reference_run / "model.pt")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    # TensorBoard holds each step once: what the stopped run logged is not repeated.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    segments = _strict_json(folder / "run.json")["segments"]
    assert [s["from_step"] for s in segments] == [0, stopped] and segments[1]["config_changes"] == {}


def test_states_are_saved_every_n_steps_and_the_latest_kept(reference_run: Path) -> None:
    # Every 3 steps and at each epoch's end (4, 8): 3, 4, 6, 8, of which the latest 2 stay.
    assert sorted(p.name for p in (reference_run / "state").iterdir()) == ["step-000000006.pt", "step-000000008.pt"]


def test_extending_a_cosine_run_plans_the_schedule_over_the_new_length(
        reference_run: Path, training_prepared: Path, tmp_path: Path) -> None:
    shutil.copytree(reference_run, tmp_path / "experiments" / "extended")
    refused = write_train_config(tmp_path / "refused.toml", training_prepared, tmp_path / "experiments", "extended",
                                 optimizer={"lr": 0.01})
    with pytest.raises(ConfigError, match=r"optimizer.lr 0.001 → 0.01"):
        train(load_train_config(refused), resume=True, progress=False)
    same = write_train_config(tmp_path / "same.toml", training_prepared, tmp_path / "experiments", "extended")
    with pytest.raises(ConfigError, match="has done 2 epochs; training.epochs = 2 leaves nothing to do"):
        train(load_train_config(same), resume=True, progress=False)

    longer = load_train_config(write_train_config(tmp_path / "longer.toml", training_prepared,
                                                  tmp_path / "experiments", "extended", training={"epochs": 3}))
    result = train(longer, resume=True, progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    rows = _steps(longer.folder)
    assert rows[:8] == _steps(reference_run)
    extension = [float(r["lr"]) for r in rows[8:]]
    assert extension == [learning_rate(longer, step, 4) for step in range(8, 12)]
    assert extension[0] == pytest.approx(1e-3 * 0.25) and all(lr > 0 for lr in extension)
    changes = _strict_json(longer.folder / "run.json")["segments"][-1]["config_changes"]
    assert changes["training.epochs"] == [2, 3]


def test_an_existing_experiment_is_never_overwritten_by_accident(reference_run: Path, training_prepared: Path,
                                                                 tmp_path: Path) -> None:
    from node.cli import main

    shutil.copytree(reference_run, tmp_path / "experiments" / "taken")
    config = write_train_config(tmp_path / "taken.toml", training_prepared, tmp_path / "experiments", "taken")
    with pytest.raises(DataError, match="already holds an experiment .*--resume.*--overwrite"):
        train(load_train_config(config), progress=False)
    fresh = write_train_config(tmp_path / "fresh.toml", training_prepared, tmp_path / "experiments", "fresh")
    with pytest.raises(DataError, match="holds no training state .* to continue"):
        train(load_train_config(fresh), resume=True, progress=False)
    assert main(["train", "--config", str(config), "--resume", "--overwrite"]) == 1


def test_each_slice_has_its_own_flips_whatever_the_workers(training_prepared: Path) -> None:
    spec = default_model_config("resnet18").preprocess
    dataset = CachedSlices(training_prepared, "train", spec, flips=True, seed=42)
    plain = CachedSlices(training_prepared, "train", spec, flips=False)

    def flips_seen(workers: int, epoch: int) -> list[tuple[bool, bool]]:
        order = EpochOrder(len(dataset), seed=42)
        order.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=2, sampler=order, num_workers=workers)
        seen = []
        indices = [index for index, _ in order]
        for (batch, _), start in zip(loader, range(0, len(indices), 2)):
            for x, index in zip(batch, indices[start:start + 2]):
                base = plain[index][0]
                seen.append(next((h, v) for h in (False, True) for v in (False, True)
                                 if torch.equal(x, _flipped(base, h, v))))
        return seen

    two_workers = flips_seen(2, epoch=0)
    assert two_workers == flips_seen(0, epoch=0)  # the same draws with 0 or 2 workers
    # Worker copies of one generator gave pairs of identical flips; keyed draws do not.
    pairs = list(zip(two_workers[0::2], two_workers[1::2]))
    assert any(a != b for a, b in pairs) and len(set(two_workers)) >= 3
    assert flips_seen(2, epoch=1) != two_workers  # and new draws each epoch


def _flipped(x: torch.Tensor, horizontal: bool, vertical: bool) -> torch.Tensor:
    dims = [d for d, on in ((2, horizontal), (1, vertical)) if on]
    return torch.flip(x, dims) if dims else x


def test_metrics_files_are_strict_json_and_log_the_rate_used(reference_run: Path) -> None:
    metrics = _strict_json(reference_run / "metrics.json")
    rows = _steps(reference_run)
    for record in metrics["history"]:
        first = next(r for r in rows if int(r["epoch"]) == record["epoch"])
        last = [r for r in rows if int(r["epoch"]) == record["epoch"]][-1]
        assert record["lr"] == float(first["lr"]) and record["lr_end"] == float(last["lr"])
    assert metrics["history"][0]["lr"] == 1e-3  # the rate the first epoch trained at, not the next one's
    mode = (reference_run / "metrics.json").stat().st_mode & 0o777
    assert (reference_run / "model.pt").stat().st_mode & 0o777 == mode


def test_an_empty_validation_list_is_warned_about_and_stays_json(training_prepared: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    shutil.copytree(training_prepared, prepared)
    header = (prepared / "splits" / "val.csv").read_text().splitlines()[0]
    (prepared / "splits" / "val.csv").write_text(header + "\n")
    config = load_train_config(write_train_config(tmp_path / "t.toml", prepared, tmp_path / "experiments", "noval",
                                                  training={"epochs": 1, "max_steps_per_epoch": 1, "workers": 0}))
    result = train(config, progress=False)
    metrics = _strict_json(config.folder / "metrics.json")
    assert metrics["history"][0]["val_loss"] is None and result.best_epoch == 1
    assert any("val.csv is empty" in w for w in metrics["warnings"])


def test_tensorboard_events_hold_every_step_and_epoch(reference_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(reference_run / "tensorboard")).Reload()
    rows = _steps(reference_run)
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [int(r["step"]) for r in rows]
    # TensorBoard keeps float32; steps.csv keeps the exact value.
    assert [e.value for e in losses] == [float(np.float32(r["loss"])) for r in rows]
    assert [e.value for e in events.Scalars("train/lr")] == [float(np.float32(r["lr"])) for r in rows]
    assert [e.step for e in events.Scalars("epoch/val_loss")] == [4, 8]


def test_the_run_is_recorded_in_the_experiment_and_the_checkpoint(reference_run: Path,
                                                                  training_prepared: Path) -> None:
    run = _strict_json(reference_run / "run.json")
    hashes = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (training_prepared / "splits").glob("*.csv")}
    assert run["splits_sha256"] == hashes and set(hashes) == {"train", "val", "test", "val_full", "test_full"}
    segment = run["segments"][0]
    assert segment["versions"]["torch"] == metadata.version("torch") and segment["processes"] == 1
    checkout = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                              text=True)
    if checkout.returncode == 0:  # the code runs from this checkout
        assert segment["git_commit"] == checkout.stdout.strip()
    training = load_checkpoint(reference_run / "model.pt")[1].provenance.training
    assert training["splits_sha256"] == hashes
    assert training["config"]["optimizer.lr"] == 1e-3 and training["config"]["training.seed"] == 42
    assert training["data"]["training_data"] == "synthetic"
    assert training["versions"]["ichnode"] and training["initial_weights"] == {"init_from": None, "pretrained": {}}
