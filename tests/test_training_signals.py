"""Training a cluster can stop: SIGTERM to the whole process group (a scheduler's
pre-emption) saves the state and `--resume` continues the run; a diverged run stops at its
first non-finite step and keeps only finite states. All on synthetic slices (tests/trainrun.py)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from node.errors import TrainingDiverged
from tests.peers import wait_for
from tests.trainrun import write_train_config
from training.model.checkpoint import load_checkpoint
from training.train import _check_step, _check_weights, _Run, load_train_config, train


def _all_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = [*state["model"].values()]
    for slots in state["optimizer"]["state"].values():
        tensors.extend(value for value in slots.values() if isinstance(value, torch.Tensor))
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_a_diverged_run_stops_at_its_first_non_finite_step_and_keeps_finite_states(
        training_prepared: Path, tmp_path: Path) -> None:
    # lr 1e12: the first step is finite, the weights it makes give a NaN loss at step 2.
    config = load_train_config(write_train_config(
        tmp_path / "train.toml", training_prepared, tmp_path / "experiments", "diverged", optimizer={"lr": 1e12},
        training={"epochs": 1, "workers": 0, "checkpoint_every_steps": 1, "keep_checkpoints": 10,
                  "deterministic": False}))
    with pytest.raises(TrainingDiverged, match=r"the loss of epoch 1, step 2 \(step 2 of the epoch\) is nan") as caught:
        train(config, progress=False)
    states = sorted((config.folder / "state").glob("step-*.pt"))
    assert [p.name for p in states] == ["step-000000001.pt"]  # step 2 was never applied nor saved
    assert str(states[0]) in str(caught.value)
    assert all(_all_finite(p) for p in states)
    assert not (config.folder / "model.pt").exists()  # no epoch ended: no best checkpoint of NaN weights

    # --resume starts from the finite state, not from NaN weights: it repeats step 2 and stops there again.
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 2 "):
        train(config, resume=True, progress=False)
    assert all(_all_finite(p) for p in sorted((config.folder / "state").glob("step-*.pt")))


def test_a_non_finite_gradient_or_weight_is_named(tmp_path: Path) -> None:
    config = load_train_config(write_train_config(tmp_path / "train.toml", tmp_path, tmp_path / "experiments", "x"))
    model = nn.Linear(2, 2)
    run = _Run(model, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cuda", enabled=False),
               {})
    model.weight.grad = torch.zeros_like(model.weight)
    _check_step(config, run, 0.5, 0, 0, checks_gradients=True)  # finite: no error
    model.weight.grad[0, 1] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"the gradient norm of epoch 1, step 1 .* is inf"):
        _check_step(config, run, 0.5, 0, 0, checks_gradients=True)
    _check_step(config, run, 0.5, 0, 0, checks_gradients=False)  # mixed precision: the AMP scaler's to handle
    _check_weights(config, run)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"after step 0, model.bias holds non-finite values"):
        _check_weights(config, run)


def _steps(folder: Path) -> list[dict]:
    with open(folder / "steps.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _start_in_own_group(config_path: Path) -> subprocess.Popen:
    """`ichnode train` as a batch scheduler starts it: in a process group of its own (setsid),
    with its DataLoader workers (tests.trainrun: workers = 2) in the same group."""
    command = ["setsid", sys.executable, "-m", "node.cli", "train", "--config", str(config_path)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _stop_and_resume(reference_run: Path, training_prepared: Path, tmp_path: Path, name: str, signal_it) -> str:
    """Start a reference run, signal it once its first step is logged, check that it stopped
    with its state saved, resume it, and check that it then repeats the uninterrupted run."""
    config_path = write_train_config(tmp_path / "train.toml", training_prepared, tmp_path / "experiments", name)
    folder = tmp_path / "experiments" / name
    process = _start_in_own_group(config_path)
    try:
        wait_for(lambda: (folder / "steps.csv").is_file() and len(_steps(folder)) >= 1, timeout=300,
                 what="the first training step")
        assert len(_children(process.pid)) == 2  # the two DataLoader workers are running
        signal_it(process)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 143, err
    assert "internal error" not in err and "--resume" in err
    stopped = len(_steps(folder))
    assert 1 <= stopped < 4, "the run was to stop inside its first epoch of 4 steps"
    assert (folder / "state" / f"step-{stopped:09d}.pt").is_file()

    train(load_train_config(config_path), resume=True, progress=False)
    assert _steps(folder) == _steps(reference_run)  # every step's loss and learning rate, exactly
    resumed, uninterrupted = load_checkpoint(folder / "model.pt")[0], load_checkpoint(reference_run / "model.pt")[0]
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), uninterrupted.state_dict().values()))
    return err


def test_sigterm_to_the_process_group_saves_the_state_and_resume_continues(
        reference_run: Path, training_prepared: Path, tmp_path: Path) -> None:
    # As SLURM's pre-emption and scancel do: the main process and its workers all get SIGTERM.
    err = _stop_and_resume(reference_run, training_prepared, tmp_path, "group",
                           lambda process: os.killpg(process.pid, signal.SIGTERM))
    assert "training stopped by SIGTERM after step" in err


def test_a_worker_killed_anyway_stops_the_run_with_its_state_saved(
        reference_run: Path, training_prepared: Path, tmp_path: Path) -> None:
    # A worker that cannot ignore its end (SIGKILL, the kernel's out-of-memory killer).
    err = _stop_and_resume(reference_run, training_prepared, tmp_path, "worker",
                           lambda process: os.kill(_children(process.pid)[0], signal.SIGKILL))
    assert "training stopped by the death of a DataLoader worker" in err


def test_sigterm_to_a_torchrun_group_saves_the_state_on_every_rank_and_resume_continues(
        training_prepared: Path, tmp_path: Path) -> None:
    # torchrun forwards the group's SIGTERM to each process: a rank gets it twice, and must still save.
    from tests.peers import free_port

    config_path = write_train_config(tmp_path / "train.toml", training_prepared, tmp_path / "experiments", "ddp")
    folder = tmp_path / "experiments" / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def torchrun(*extra: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "node.cli", "train", "--config", str(config_path), *extra]

    process = subprocess.Popen(["setsid", *torchrun()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    try:
        wait_for(lambda: (folder / "steps.csv").is_file() and len(_steps(folder)) >= 1, timeout=300,
                 what="the first training step")
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert "training stopped by SIGTERM after step" in err and "internal error" not in err, err[-3000:]
    stopped = len(_steps(folder))
    assert 1 <= stopped < 8
    assert (folder / "state" / f"step-{stopped:09d}.pt").is_file()
    state = torch.load(folder / "state" / f"step-{stopped:09d}.pt", map_location="cpu", weights_only=True)
    assert state["step"] == stopped and len(state["rng"]) == 2  # every rank's generators, at the same step

    resumed = subprocess.run(torchrun("--resume"), capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [int(row["step"]) for row in _steps(folder)] == list(range(1, 9))  # each step once, none lost


def test_deterministic_training_warns_instead_of_raising_and_records_the_ops_without_a_deterministic_kernel(
        training_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        recwarn: pytest.WarningsRecorder) -> None:
    import training.train as train_module

    with train_module._deterministic(True) as fallbacks:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))  # no deterministic kernel, even on a CPU
        assert fallbacks == ["put_"]
    assert not torch.are_deterministic_algorithms_enabled()
    assert any("put_ does not have a deterministic" in str(w.message) for w in recwarn)  # still shown

    # No CUDA op here lacks a deterministic kernel: one that does is run in the validation.
    validate = train_module._validate

    def validate_with_a_nondeterministic_op(*args, **kwargs):
        torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return validate(*args, **kwargs)

    monkeypatch.setattr(train_module, "_validate", validate_with_a_nondeterministic_op)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    config = load_train_config(write_train_config(
        tmp_path / "train.toml", training_prepared, tmp_path / "experiments", "deterministic",
        training={"epochs": 1, "max_steps_per_epoch": 1, "workers": 0, "deterministic": True}))
    train(config, progress=False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    segment = json.loads((config.folder / "run.json").read_text())["segments"][-1]
    assert segment["nondeterministic_ops"] == ["put_"]
