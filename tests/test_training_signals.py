"""Training a cluster can stop: a diverged run stops at its first non-finite step and keeps
only finite states. All on synthetic slices (tests/trainrun.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from node.errors import TrainingDiverged
from tests.trainrun import write_train_config
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
