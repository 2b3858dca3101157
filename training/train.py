"""`ichnode train`: the recipe of the paper's authors' public code by default, other
optimisers and schedules by config.

CUDA with mixed precision when present, CPU otherwise; several GPUs (or CPU processes with
gloo) through `torchrun`, which sets WORLD_SIZE/RANK/LOCAL_RANK.

A run can be stopped and resumed without changing what it computes. The data order is a
function of (seed, epoch) and each slice's augmentation of (seed, epoch, index)
(`training.datasets`), the learning rate a function of the step, and the training state
(weights, optimiser, AMP scaler, every process's random-number generators, the step
within the epoch) is saved every `checkpoint_every_steps` steps, at each epoch's end and
when the process is asked to stop (SIGTERM, SIGINT). `--resume` continues from the latest
state exactly as the uninterrupted run would have, and refuses a config that differs from
the run's except in the keys that cannot change the result (or `training.epochs`, which
extends a run: the schedule is then planned over the new length, and the change recorded).
The checkpoint kept is the one with the best validation ROC-AUC.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
import typing
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from storage.atomic import atomic_write
from training.configfile import anchor_paths, read_toml, section_from_table
from training.datasets import CachedSlices, EpochOrder
from training.errors import ConfigError, DataError, TrainingDiverged, TrainingStopped
from training.inference.device import resolve_device
from training.inference.settings import Device
from training.metrics import roc_auc
from training.model.architectures import architecture_spec
from training.model.checkpoint import Provenance, default_model_config, initial_model, save_checkpoint
from training.model.scope import Scope
from training.pretrained import check_sha256_text, load_pretrained_parts
from training.tracking import StepLog, code_record, json_safe, split_hashes

__all__ = ["TrainConfig", "load_train_config", "train", "TrainResult", "learning_rate", "RESUMABLE_CHANGES"]

# Keys a resumed run may change: they decide how the run is carried out or how long it
# goes on (training.epochs), not what one step computes. Every other key must match.
RESUMABLE_CHANGES = frozenset({
    "training.epochs", "training.workers", "training.device", "training.checkpoint_every_steps",
    "training.keep_checkpoints", "experiment.half_precision", "experiment.folder", "experiment.name",
    "data.prepared",
}) | {f"scope.{f.name}" for f in dataclasses.fields(Scope)}  # what the checkpoint declares, not what it computes
# What `ichnode train` writes into an experiment folder (and --overwrite removes).
OUTPUTS = ("config.json", "run.json", "metrics.json", "steps.csv", "curves.png", "model.pt", "state",
           "tensorboard", "last.pt")


@dataclass(frozen=True)
class DataSection:
    prepared: Path = Path("var/prepared")  # the output folder of `ichnode prepare-rsna`


@dataclass(frozen=True)
class ModelChoice:
    architecture: str = "effclass"
    init_from: Path | None = None  # a local checkpoint or state dict; empty: random
    # The paper's starting point, from local files checked by SHA-256 (docs/training.md):
    pretrained_effdet: Path | None = None  # effdet's efficientdet_d0 checkpoint, or a timm EfficientNet-B0
    pretrained_effdet_sha256: str = ""  # empty: the published prefix of a documented file
    pretrained_resnet: Path | None = None  # torchvision's ResNet IMAGENET1K_V1 weights of the same depth
    pretrained_resnet_sha256: str = ""


@dataclass(frozen=True)
class OptimizerSection:
    name: str = "sgd"  # sgd | adamw
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-3


@dataclass(frozen=True)
class ScheduleSection:
    name: str = "step"  # step (per epoch, as torch's StepLR) | cosine (per step, to 0 at the end) | none
    step_size: int = 1
    gamma: float = 0.5


@dataclass(frozen=True)
class LoopSection:
    epochs: int = 3
    batch_size: int = 4
    workers: int = 2
    device: Device = Device("auto")
    amp: bool = True  # mixed precision, CUDA only
    seed: int = 42
    flips: bool = True  # the paper's only augmentation
    max_steps_per_epoch: int = 0  # 0: the whole training list
    # Before each validation, re-estimate BatchNorm statistics over this many training
    # batches with the epoch's final weights; 0: keep the running averages (the paper).
    batchnorm_batches: int = 0
    checkpoint_every_steps: int = 1000  # resumable state every N steps (and at each epoch's end); 0: epochs only
    keep_checkpoints: int = 2  # the latest N states are kept
    deterministic: bool = False  # deterministic kernels only (needed for exact resumes on a GPU)


@dataclass(frozen=True)
class ExperimentSection:
    folder: Path = Path("experiments")
    name: str = "effclass-paper"
    half_precision: bool = False  # store the kept checkpoint's weights as float16 (half the file)


@dataclass(frozen=True)
class TrainConfig:
    """The recipe of the paper's authors' public code (the paper does not state it): SGD
    lr 1e-4, momentum 0.9, weight decay 1e-3, StepLR(1, 0.5), batch 4, 3 epochs,
    cross-entropy, random flips."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelChoice = field(default_factory=ModelChoice)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    training: LoopSection = field(default_factory=LoopSection)
    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    scope: Scope = field(default_factory=Scope)  # what the checkpoint will say it supports

    def validate(self) -> None:
        try:
            architecture_spec(self.model.architecture)
        except ValueError as exc:
            raise ConfigError(f"model.architecture: {exc}") from None
        if self.optimizer.name not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer.name must be sgd or adamw, got {self.optimizer.name!r}")
        if self.schedule.name not in ("step", "cosine", "none"):
            raise ConfigError(f"schedule.name must be step, cosine or none, got {self.schedule.name!r}")
        for key, value in (("training.epochs", self.training.epochs),
                           ("training.batch_size", self.training.batch_size),
                           ("training.keep_checkpoints", self.training.keep_checkpoints),
                           ("schedule.step_size", self.schedule.step_size)):
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        # The ranges torch's optimisers accept (and a schedule that never raises the learning
        # rate); outside them torch would fail mid-start with its own ValueError.
        for key, value, inside, allowed in (
                ("optimizer.lr", self.optimizer.lr, lambda v: 0 < v < math.inf, "a finite number > 0"),
                ("optimizer.momentum", self.optimizer.momentum, lambda v: 0 <= v < 1, "in [0, 1)"),
                ("optimizer.weight_decay", self.optimizer.weight_decay, lambda v: 0 <= v < math.inf,
                 "a finite number ≥ 0"),
                ("schedule.gamma", self.schedule.gamma, lambda v: 0 < v <= 1, "in (0, 1]")):
            if not inside(value):  # NaN fails every comparison
                raise ConfigError(f"{key} must be {allowed}, got {value}")
        loop = self.training
        if min(loop.workers, loop.max_steps_per_epoch, loop.batchnorm_batches, loop.checkpoint_every_steps) < 0:
            raise ConfigError("training.workers, training.max_steps_per_epoch, training.batchnorm_batches and "
                              "training.checkpoint_every_steps must be ≥ 0")
        model = self.model
        check_sha256_text("model.pretrained_effdet_sha256", model.pretrained_effdet_sha256)
        check_sha256_text("model.pretrained_resnet_sha256", model.pretrained_resnet_sha256)
        if model.init_from is not None and (model.pretrained_effdet or model.pretrained_resnet):
            raise ConfigError("model.init_from gives every weight; it cannot be combined with model.pretrained_effdet "
                              "or model.pretrained_resnet")
        if model.pretrained_effdet is not None and model.architecture != "effclass":
            raise ConfigError(f"model.pretrained_effdet: architecture {model.architecture!r} has no EfficientDet part")

    @property
    def folder(self) -> Path:
        return self.experiment.folder / self.experiment.name


def load_train_config(path: Path | None) -> TrainConfig:
    """The default recipe, overridden by the TOML file at `path` (paths relative to it)."""
    data: dict[str, Any] = read_toml(Path(path)) if path else {}
    base = Path(path).resolve().parent if path else Path.cwd()
    sections = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section [{unknown[0]}]; known: {', '.join(sorted(sections))}")
    values = {name: anchor_paths(section_from_table(cls, name, data.get(name, {})), base)
              for name, cls in sections.items()}
    config = TrainConfig(**values)
    config.validate()
    return config


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """`section.key` → value, as JSON holds it (paths as strings)."""
    return {f"{section}.{key}": (str(value) if isinstance(value, (Path, str)) else value)
            for section, table in asdict(config).items() for key, value in table.items()}


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """The learning rate of optimiser step `step` (0-based), a pure function of the step so
    that a resumed or extended run needs no scheduler state: `step` multiplies by gamma
    every step_size epochs (torch's StepLR, stepped per epoch); `cosine` falls from lr to
    0 over all the run's steps (epochs × steps per epoch, so extending a run plans the
    rest of the curve over the new length); `none` keeps lr."""
    base, schedule = config.optimizer.lr, config.schedule
    if schedule.name == "step":
        return base * schedule.gamma ** ((step // steps_per_epoch) // schedule.step_size)
    if schedule.name == "cosine":
        total = config.training.epochs * steps_per_epoch
        return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return base


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    best_epoch: int
    best_val_roc_auc: float | None
    history: list[dict]


@dataclass(frozen=True)
class _Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: Device) -> tuple[_Distributed, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return _Distributed(), resolve_device(device_name, key="training.device")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return _Distributed(dist.get_rank(), world, local_rank), device


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


def _recompute_batchnorm(model: nn.Module, loader: Iterable, device: torch.device, batches: int) -> None:
    """Replace BatchNorm running statistics by exact averages over `batches` training batches.

    Short runs need it: EfficientDet's BiFPN averages with momentum 0.01, so after a few
    hundred steps its running statistics still remember the random start, and eval-mode
    predictions can be worse than chance while training-mode ones are good.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches == 0:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over the batches seen
    model.train()
    with torch.no_grad():
        for step, (x, _) in enumerate(loader):
            if step >= batches:
                break
            model(x.to(device, memory_format=torch.channels_last))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _validate(model: nn.Module, loader: Iterable, device: torch.device) -> tuple[float | None, float | None]:
    """(mean loss, ROC-AUC) on the validation list; the loss is None when the list is
    empty, the AUC None when it holds one class only."""
    model.eval()
    losses, probabilities, labels = [], [], []
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    with torch.inference_mode():
        for x, y in loader:
            logits = model(x.to(device)).float()
            losses.append(float(loss_fn(logits, y.to(device))))
            probabilities.append(torch.softmax(logits, 1)[:, 1].cpu().numpy())
            labels.append(y.numpy())
    if not labels:
        return None, None
    p, y = np.concatenate(probabilities), np.concatenate(labels)
    auc = roc_auc(y, p) if len(set(y.tolist())) == 2 else None
    return sum(losses) / len(y), auc


def _plot_curves(history: list[dict], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4))
    loss_axes, auc_axes = figure.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    loss_axes.plot(epochs, [h["train_loss"] for h in history], marker="o", label="training")
    loss_axes.plot(epochs, [h["val_loss"] if h["val_loss"] is not None else math.nan for h in history], marker="o",
                   label="validation")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_axes.legend()
    auc_axes.plot(epochs, [h["val_roc_auc"] if h["val_roc_auc"] is not None else math.nan for h in history],
                  marker="o", color="tab:green")
    auc_axes.set(xlabel="epoch", ylabel="ROC-AUC", title="validation ROC-AUC", ylim=(0, 1))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train, validate each epoch, keep the best checkpoint; returns where it is.

    Without `resume`, an experiment folder that already holds a run is refused unless
    `overwrite` replaces it; with `resume`, the run continues from its latest state. A
    SIGTERM or SIGINT stops the run after the step in progress, its state saved
    (TrainingStopped says where).
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the experiment and --overwrite replaces it: choose one")
    if config.training.deterministic:  # cuBLAS is deterministic only with it, read when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dist_info, device = _init_distributed(config.training.device)
    try:
        with _deterministic(config.training.deterministic) as fallbacks, _StopRequest() as stop:
            return _train(config, dist_info, device, resume=resume, overwrite=overwrite,
                          progress=progress and dist_info.main, stop=stop, fallbacks=fallbacks)
    finally:
        if dist_info.world > 1:
            dist.destroy_process_group()


_NO_DETERMINISTIC_KERNEL = " does not have a deterministic implementation"  # torch's warn_only warning


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[list[str]]:
    """Deterministic kernels only, while training; yields the list of the ops that had none.

    On a GPU some kernels (and cuDNN's autotuner) give other results at each run, so without
    this a resumed run would not repeat the uninterrupted one; on a CPU the kernels used
    here are deterministic anyway. Some ops have no deterministic CUDA kernel (torch
    documents AdaptiveAvgPool2d's backward, which every architecture here uses): with
    warn_only torch warns and runs the nondeterministic one instead of raising, and each such
    op is noted, for the run record, as it is warned about."""
    fallbacks: list[str] = []
    if not enabled:
        yield fallbacks
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.filterwarnings("default", message=f".*{_NO_DETERMINISTIC_KERNEL}", category=UserWarning)
        show = warnings.showwarning

        def note(message: Warning | str, category: type[Warning], *where: Any, **more: Any) -> None:
            op, found, _ = str(message).partition(_NO_DETERMINISTIC_KERNEL)
            if found and op not in fallbacks:
                fallbacks.append(op)
            show(message, category, *where, **more)

        warnings.showwarning = note
        try:
            yield fallbacks
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])
            torch.backends.cudnn.benchmark = before[2]


class _WorkerLost(RuntimeError):
    """A DataLoader worker died; raised where the loader asks for a batch, so the run's state is whole."""


def _leave_stop_signals_to_the_main_process(_worker_id: int) -> None:
    """A DataLoader worker's start: SIGTERM and SIGINT sent to the whole process group (SLURM's
    pre-emption, `scancel`, torchrun's shutdown, Ctrl-C) would otherwise kill the workers
    while the main process saves its state; the main process stops them when it is done."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopRequest:
    """SIGTERM or SIGINT while training (a scheduler's pre-emption, Ctrl-C) is noted, so the
    step in progress finishes and the state is saved before the run stops; a second SIGINT
    (Ctrl-C again) stops at once. Further SIGTERMs are noted only: torchrun forwards the
    SIGTERM its process group got to each process, and a scheduler that will not wait sends
    SIGKILL. A DataLoader worker that dies anyway stops the run the same way."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous[number] = signal.signal(number, self._note)
        return self

    def _note(self, number: int, _frame: Any) -> None:
        if self.requested is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signal.Signals(number).name

    def batches(self, loader: Iterable) -> Iterator:
        """The batches of `loader`; a dead DataLoader worker is raised as _WorkerLost when a batch is asked for."""
        iterator = iter(loader)
        self._watch_workers()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except RuntimeError as exc:  # "DataLoader worker (pid(s) …) exited unexpectedly"
                if "DataLoader worker" not in str(exc):
                    raise
                raise _WorkerLost(str(exc)) from exc
            yield batch

    def _watch_workers(self) -> None:
        """Once DataLoader workers exist, torch's SIGCHLD handler raises when one dies, wherever
        the main process is: in the middle of an optimiser step, say. It is wrapped so that the
        death is noted as a request to stop instead; a loader that needs the dead worker's
        batch then says so itself (in `batches`), between steps."""
        if signal.SIGCHLD in self.previous or threading.current_thread() is not threading.main_thread():
            return
        loader_handler = signal.getsignal(signal.SIGCHLD)
        if not callable(loader_handler):  # no worker processes (training.workers = 0)
            return
        self.previous[signal.SIGCHLD] = loader_handler

        def note_worker_death(number: int, frame: Any) -> None:
            try:
                loader_handler(number, frame)
            except RuntimeError as exc:  # "DataLoader worker (pid …) is killed by signal: …"
                if self.requested is None:
                    self.requested = f"the death of a DataLoader worker ({exc})"

        signal.signal(signal.SIGCHLD, note_worker_death)

    def __exit__(self, *_exc: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


@dataclass
class _Data:
    """The prepared data of a run and its loaders."""

    summary: dict
    order: EpochOrder
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    split_hashes: dict[str, str]
    warnings: list[str]
    note: str  # what the data is, for provenance and plots


@dataclass
class _Run:
    """What changes while training: the model, its optimiser state and the best so far."""

    model: nn.Module
    net: nn.Module  # the model, wrapped for DDP when there are several processes
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    initial_weights: dict
    step: int = 0  # optimiser steps done
    history: list[dict] = field(default_factory=list)
    best_auc: float | None = None
    best_epoch: int = -1
    best_score: float = -math.inf
    epoch_loss: float = 0.0  # loss × slices so far in the epoch in progress
    epoch_seen: int = 0
    epoch_seconds: float = 0.0
    epoch_lr: list[float] = field(default_factory=list)  # learning rate of the epoch's first and latest step

    def state(self, config: TrainConfig, data: _Data, world: int, rng: list[dict]) -> dict:
        return {"format": STATE_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "steps_per_epoch": data.steps_per_epoch,
                "world": world, "rng": rng, "config": flat_config(config), "splits_sha256": data.split_hashes,
                "initial_weights": self.initial_weights, "history": self.history, "best_auc": self.best_auc,
                "best_epoch": self.best_epoch, "best_score": self.best_score, "epoch_loss": self.epoch_loss,
                "epoch_seen": self.epoch_seen, "epoch_seconds": self.epoch_seconds, "epoch_lr": self.epoch_lr}

    def restore(self, state: dict, rank: int) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for name in ("step", "initial_weights", "history", "best_auc", "best_epoch", "best_score", "epoch_loss",
                     "epoch_seen", "epoch_seconds", "epoch_lr"):
            setattr(self, name, state[name])
        generators = state["rng"][rank]
        torch.set_rng_state(generators["cpu"])
        if generators.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(generators["cuda"])


STATE_FORMAT = "ichnode-training-state-1"


def _data(config: TrainConfig, dist_info: _Distributed, device: torch.device) -> _Data:
    loop, prepared = config.training, config.data.prepared
    summary_path = prepared / "prepare.json"
    if not summary_path.is_file():
        raise DataError(f"{prepared} is not a prepared folder (no prepare.json); run `ichnode prepare-rsna`")
    summary = json.loads(summary_path.read_text())
    if "provenance" not in summary:
        raise DataError(f"{prepared} was prepared by an earlier ichnode that guessed what the data is from its layout; "
                        "run `ichnode prepare-rsna` on it again (it reuses the cache where the files are unchanged)")
    spec = default_model_config(config.model.architecture).preprocess
    train_set = CachedSlices(prepared, "train", spec, flips=loop.flips, seed=loop.seed)
    val_set = CachedSlices(prepared, "val", spec)
    if len(train_set) == 0:
        raise DataError(f"{prepared}/splits/train.csv is empty")
    order = EpochOrder(len(train_set), seed=loop.seed, rank=dist_info.rank, world=dist_info.world)
    # Each loader has a generator of its own: without one, every new iterator draws its
    # workers' seed from the global generator, which the model's own draws (EffClass's
    # drop-path) use too, and a resumed run would drift from the uninterrupted one.
    train_loader = DataLoader(train_set, batch_size=loop.batch_size, sampler=order, num_workers=loop.workers,
                              generator=torch.Generator().manual_seed(loop.seed), pin_memory=device.type == "cuda",
                              persistent_workers=loop.workers > 0,
                              worker_init_fn=_leave_stop_signals_to_the_main_process)
    val_loader = DataLoader(val_set, batch_size=loop.batch_size * 2, num_workers=loop.workers,
                            generator=torch.Generator().manual_seed(loop.seed),
                            worker_init_fn=_leave_stop_signals_to_the_main_process)
    steps = math.ceil(order.per_process / loop.batch_size)
    steps = min(steps, loop.max_steps_per_epoch) if loop.max_steps_per_epoch else steps
    warnings = []
    if len(val_set) == 0:
        warnings.append(f"{prepared}/splits/val.csv is empty: no epoch is validated, and the checkpoint kept is the "
                        "last epoch's, not one chosen on validation data")
    elif len(set(val_set.labels.tolist())) < 2:
        warnings.append(f"{prepared}/splits/val.csv holds one class only: validation ROC-AUC is undefined and the "
                        "checkpoint kept is the one with the lowest validation loss")
    note = (f"{summary['training_data']} data ({summary['layout']} layout) prepared in {prepared} "
            f"({len(train_set)} balanced training slices, {len(val_set)} validation slices)")
    return _Data(summary, order, train_loader, val_loader, steps, split_hashes(prepared), warnings, note)


def _state_paths(folder: Path) -> list[Path]:
    return sorted((folder / "state").glob("step-*.pt"))


def _check_folder(config: TrainConfig, dist_info: _Distributed, *, resume: bool, overwrite: bool) -> Path | None:
    """The state to resume from (None for a new run), once the folder is fit for the run."""
    folder = config.folder
    if resume:
        states = _state_paths(folder)
        if states:
            return states[-1]
        if (folder / "last.pt").exists():
            raise DataError(f"{folder} was written by an earlier ichnode, whose epoch-end state cannot be resumed "
                            "faithfully; start it again with --overwrite")
        raise DataError(f"--resume: {folder} holds no training state (state/step-*.pt) to continue; "
                        "start without --resume")
    existing = [name for name in OUTPUTS if (folder / name).exists()]
    if existing and not overwrite:
        raise DataError(f"{folder} already holds an experiment ({', '.join(existing)}); continue it with --resume, "
                        "replace it with --overwrite, or choose another experiment.name")
    if existing and dist_info.main:
        for name in existing:
            path = folder / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def _config_changes(config: TrainConfig, data: _Data, state: dict, world: int) -> dict[str, list]:
    """The keys a resume changes, [old, new]; refused unless they cannot change what a step computes."""
    now, then = flat_config(config), state["config"]
    changes = {key: [then.get(key), now.get(key)] for key in sorted(set(now) | set(then))
               if now.get(key) != then.get(key)}
    refused = [key for key in changes if key not in RESUMABLE_CHANGES]
    if refused:
        listed = "; ".join(f"{key} {changes[key][0]!r} → {changes[key][1]!r}" for key in refused)
        raise ConfigError(f"--resume continues the run in {config.folder}, but its config changed: {listed}. Keep "
                          "the run's values, or start a new experiment (another experiment.name, or --overwrite)")
    if state["world"] != world:
        raise ConfigError(f"the run in {config.folder} was trained by {state['world']} processes; resume it with as "
                          f"many (this is {world}), or the data order changes")
    changed = [name for name, digest in data.split_hashes.items() if state["splits_sha256"].get(name) != digest]
    if changed or set(state["splits_sha256"]) != set(data.split_hashes):
        raise DataError(f"the split lists of {config.data.prepared} differ from the ones the run in {config.folder} "
                        f"started on ({', '.join(changed) or 'other lists'}); resume on the same prepared data")
    done = state["step"] // state["steps_per_epoch"]
    if config.training.epochs < done or (config.training.epochs == done and state["step"] % state["steps_per_epoch"] == 0
                                          and len(state["history"]) == done):
        raise ConfigError(f"the run in {config.folder} has done {done} epochs; training.epochs = "
                          f"{config.training.epochs} leaves nothing to do (raise it to extend the run)")
    return changes


def _start(config: TrainConfig, dist_info: _Distributed, device: torch.device, data: _Data,
           state_path: Path | None) -> tuple[_Run, dict]:
    """The model and optimiser, new or restored; and the config changes a resume makes."""
    model_choice = config.model
    model = initial_model(model_choice.architecture, init_from=model_choice.init_from)
    initial = {"init_from": str(model_choice.init_from) if model_choice.init_from else None, "pretrained": {}}
    if state_path is None:
        initial["pretrained"] = load_pretrained_parts(
            model, model_choice.architecture, effdet=model_choice.pretrained_effdet,
            effdet_sha256=model_choice.pretrained_effdet_sha256, resnet=model_choice.pretrained_resnet,
            resnet_sha256=model_choice.pretrained_resnet_sha256)
    # Channels-last runs EffClass's convolutions faster on a CPU (forward 0.31 against 0.42 s
    # per slice on 2 cores) and suits tensor cores on a GPU; the weights saved are the same.
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = _optimizer(config, model)
    scaler = torch.amp.GradScaler("cuda", enabled=config.training.amp and device.type == "cuda")
    changes: dict = {}
    if state_path is not None:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"{state_path} is not a training state this ichnode writes")
        changes = _config_changes(config, data, state, dist_info.world)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if dist_info.world > 1 else model
    run = _Run(model, net, optimizer, scaler, initial)
    if state_path is not None:
        run.restore(state, dist_info.rank)
    return run, changes


def _rng_states(dist_info: _Distributed) -> list[dict]:
    """Every process's random-number generator states, gathered (all processes call this)."""
    own = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if dist_info.world == 1:
        return [own]
    gathered: list[Any] = [None] * dist_info.world
    dist.all_gather_object(gathered, own)
    return gathered


def _gradient_norm(model: nn.Module) -> float:
    """The L2 norm of all gradients together (in float64, so that a large finite norm is not inf)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) for p in model.parameters()
             if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _diverged(config: TrainConfig, what: str) -> TrainingDiverged:
    states = _state_paths(config.folder)
    kept = (f"the latest state, {states[-1]}, is finite" if states else f"no state was saved in {config.folder}")
    return TrainingDiverged(
        f"training diverged: {what}. It stopped there and saved nothing non-finite: {kept}. --resume repeats the "
        "same steps and diverges again; start a new experiment with a lower optimizer.lr")


def _check_step(config: TrainConfig, run: _Run, loss: float, epoch: int, step_in_epoch: int, *,
                checks_gradients: bool) -> None:
    """Stop at the first step whose loss (over all processes) or gradient norm is not finite,
    before the optimiser applies it. With mixed precision the gradients are left to the AMP
    scaler, which skips a step whose scaled gradients overflow and lowers its scale."""
    where = f"epoch {epoch + 1}, step {run.step + 1} (step {step_in_epoch + 1} of the epoch)"
    if not math.isfinite(loss):
        raise _diverged(config, f"the loss of {where} is {loss}")
    if checks_gradients:
        norm = _gradient_norm(run.model)
        if not math.isfinite(norm):
            raise _diverged(config, f"the gradient norm of {where} is {norm}")


def _nonfinite_tensor(tree: Any, name: str = "") -> str | None:
    """The name of the first floating-point tensor in `tree` (state dicts, lists) holding NaN or inf."""
    if isinstance(tree, torch.Tensor):
        return name if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = _nonfinite_tensor(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def _check_weights(config: TrainConfig, run: _Run) -> None:
    """Refuse to save (or validate) weights or optimiser state holding NaN or inf."""
    found = (_nonfinite_tensor(run.model.state_dict(), "model")
             or _nonfinite_tensor(run.optimizer.state_dict()["state"], "optimizer"))
    if found is not None:
        raise _diverged(config, f"after step {run.step}, {found} holds non-finite values")


def _save_state(config: TrainConfig, run: _Run, data: _Data, dist_info: _Distributed) -> Path:
    """The resumable state after step `run.step`; the latest keep_checkpoints are kept. Every
    process checks that the weights are finite first, so that all stop together if not."""
    _check_weights(config, run)
    rng = _rng_states(dist_info)
    path = config.folder / "state" / f"step-{run.step:09d}.pt"
    if dist_info.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = run.state(config, data, dist_info.world, rng)
        atomic_write(path, lambda handle: torch.save(state, handle))
        for old in _state_paths(config.folder)[:-config.training.keep_checkpoints]:
            old.unlink()
    return path


def _step_totals(loss: float, count: int, stopping: bool, dist_info: _Distributed) -> tuple[float, int, bool]:
    """(mean loss, slices, stop) of this step over all processes: they stop at the same step."""
    if dist_info.world == 1:
        return loss, count, stopping
    totals = torch.tensor([loss * count, float(count), float(stopping)], dtype=torch.float64)
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]), int(totals[1]), bool(totals[2])


def _train_steps(config: TrainConfig, run: _Run, data: _Data, epoch: int, device: torch.device, log: StepLog | None,
                 stop: _StopRequest, dist_info: _Distributed, progress: bool) -> bool:
    """The remaining steps of `epoch`; False when a stop was requested (its state saved)."""
    loop, steps = config.training, data.steps_per_epoch
    first = run.step - epoch * steps  # steps of this epoch done before a resume
    data.order.set_epoch(epoch, first * loop.batch_size)
    use_amp = run.scaler.is_enabled()
    loss_fn = nn.CrossEntropyLoss()
    run.net.train()
    # disable=None: a bar on a terminal, nothing in a log file (the epoch lines remain).
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{loop.epochs}", unit="batch",
               disable=None if progress else True)
    started = time.perf_counter()
    for step_in_epoch, (x, y) in zip(range(first, steps), stop.batches(data.train_loader)):
        lr = learning_rate(config, run.step, steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        run.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss = loss_fn(run.net(x), y)
        run.scaler.scale(loss).backward()
        step_loss, count, stopping = _step_totals(float(loss.detach()), len(y), stop.requested is not None, dist_info)
        _check_step(config, run, step_loss, epoch, step_in_epoch, checks_gradients=not use_amp)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.step += 1
        run.epoch_loss += step_loss * count
        run.epoch_seen += count
        run.epoch_lr = [run.epoch_lr[0] if run.epoch_lr else lr, lr]
        if log is not None:
            log.step(run.step, epoch + 1, step_in_epoch + 1, step_loss, lr)
        bar.update(1)
        bar.set_postfix(loss=f"{run.epoch_loss / run.epoch_seen:.4f}")
        if step_in_epoch + 1 < steps and (stopping or (loop.checkpoint_every_steps
                                                       and run.step % loop.checkpoint_every_steps == 0)):
            # The epoch's last step is saved with its validation, in _end_epoch.
            run.epoch_seconds += time.perf_counter() - started
            started = time.perf_counter()
            _save_state(config, run, data, dist_info)
            if log is not None:
                log.flush()
            if stopping:
                bar.close()
                return False
    bar.close()
    run.epoch_seconds += time.perf_counter() - started
    return True


def _end_epoch(config: TrainConfig, run: _Run, data: _Data, epoch: int, device: torch.device, log: StepLog | None,
               stop: _StopRequest, dist_info: _Distributed, progress: bool) -> None:
    """Validate (the main process), keep the checkpoint if it is the best so far, write the
    metrics and curves, and save the state (every process takes part)."""
    folder, loop = config.folder, config.training
    _check_weights(config, run)  # before validation and the best checkpoint
    if dist_info.main:
        started = time.perf_counter()
        data.order.set_epoch(epoch)
        _recompute_batchnorm(run.model, stop.batches(data.train_loader), device, loop.batchnorm_batches)
        val_loss, val_auc = _validate(run.model, stop.batches(data.val_loader), device)
        record = {"epoch": epoch + 1, "step": run.step, "train_loss": run.epoch_loss / max(run.epoch_seen, 1),
                  "val_loss": val_loss, "val_roc_auc": val_auc, "lr": run.epoch_lr[0], "lr_end": run.epoch_lr[-1],
                  "seconds": round(run.epoch_seconds + time.perf_counter() - started, 1),
                  "train_slices_seen": run.epoch_seen}
        run.history.append(record)
        # Best by validation ROC-AUC; by lower loss when validation has one class only;
        # the latest epoch when the validation list is empty.
        score = val_auc if val_auc is not None else (-val_loss if val_loss is not None else epoch)
        if score > run.best_score:
            run.best_score, run.best_epoch, run.best_auc = score, epoch + 1, val_auc
            _save_model(config, run, data, record)
        if log is not None:
            log.epoch(run.step, record)
        if progress:
            auc_text = f"{val_auc:.4f}" if val_auc is not None else "n/a"
            loss_text = f"{val_loss:.4f}" if val_loss is not None else "n/a (empty list)"
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, val loss {loss_text}, "
                  f"val ROC-AUC {auc_text}", flush=True)
    run.epoch_loss, run.epoch_seen, run.epoch_seconds, run.epoch_lr = 0.0, 0, 0.0, []
    _save_state(config, run, data, dist_info)
    if dist_info.main:
        metrics = {"data": data.note, "history": run.history, "best_epoch": run.best_epoch,
                   "best_val_roc_auc": run.best_auc, "checkpoint": str(folder / "model.pt"), "warnings": data.warnings}
        (folder / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=1, allow_nan=False) + "\n")
        _plot_curves(run.history, folder / "curves.png", f"{config.experiment.name}: {data.note}")


def _training_record(config: TrainConfig, run: _Run, data: _Data) -> dict:
    """How the weights were made, for the checkpoint (see Provenance.training)."""
    return {"config": flat_config(config), "initial_weights": run.initial_weights, "steps": run.step,
            "splits_sha256": data.split_hashes, "data": data.summary["provenance"], **code_record()}


def _save_model(config: TrainConfig, run: _Run, data: _Data, record: dict) -> None:
    epoch = record["epoch"]
    provenance = Provenance(
        training_data=data.summary["training_data"],
        description=f"{config.model.architecture} trained on {data.note}; best epoch {epoch} of "
                    f"{config.training.epochs}",
        metrics=json_safe({"val_roc_auc": record["val_roc_auc"], "val_loss": record["val_loss"], "epoch": epoch,
                           "measured_on": f"validation split of {data.note}"}),
        training=_training_record(config, run, data),
    )
    model_config = dataclasses.replace(default_model_config(config.model.architecture, provenance),
                                       scope=config.scope)
    save_checkpoint(config.folder / "model.pt", run.model, model_config, half=config.experiment.half_precision)


def _random_start_warning(model: ModelChoice) -> str | None:
    """What starts from random weights when the paper's pretrained parts are not configured
    (None when every part has its file, or `init_from` gives every weight)."""
    if model.init_from is not None:
        return None
    parts = {"model.pretrained_resnet": ("the ResNet", model.pretrained_resnet)}
    if model.architecture == "effclass":
        parts = {"model.pretrained_effdet": ("the EfficientDet backbone and BiFPN", model.pretrained_effdet), **parts}
    unset = {key: part for key, (part, path) in parts.items() if path is None}
    if not unset:
        return None
    return (f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set: {' and '.join(unset.values())} "
            f"start{'s' if len(unset) == 1 else ''} from random weights, not from the ImageNet/COCO weights the "
            "paper starts from; results will be far below the paper's (docs/training.md §2 says where to get "
            "the files)")


def _record_start(config: TrainConfig, run: _Run, data: _Data, changes: dict, world: int,
                  device: torch.device) -> None:
    """config.json (the resolved config now) and run.json (each start or resume of the run,
    with the config changes it made, the code and the data)."""
    folder = config.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(config), indent=1, default=str) + "\n")
    path = folder / "run.json"
    record = json.loads(path.read_text()) if path.is_file() else {
        "experiment": config.experiment.name, "initial_weights": run.initial_weights, "data": data.summary["provenance"],
        "splits_sha256": data.split_hashes, "steps_per_epoch": data.steps_per_epoch,
        "warnings": [warning] if (warning := _random_start_warning(config.model)) else [], "segments": []}
    record["segments"].append({
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": run.step, "config_changes": changes,
        "processes": world, "device": str(device), **code_record()})
    path.write_text(json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")


def _record_fallbacks(folder: Path, ops: list[str]) -> None:
    """run.json: the ops this segment ran without a deterministic kernel (deterministic = true);
    where any are listed, a resume may not repeat the uninterrupted run exactly."""
    path = folder / "run.json"
    record = json.loads(path.read_text())
    record["segments"][-1]["nondeterministic_ops"] = ops
    path.write_text(json.dumps(json_safe(record), indent=1, allow_nan=False) + "\n")


def _train(config: TrainConfig, dist_info: _Distributed, device: torch.device, *, resume: bool, overwrite: bool,
           progress: bool, stop: _StopRequest, fallbacks: list[str]) -> TrainResult:
    torch.manual_seed(config.training.seed + dist_info.rank)
    data = _data(config, dist_info, device)
    state_path = _check_folder(config, dist_info, resume=resume, overwrite=overwrite)
    if dist_info.world > 1:
        dist.barrier()  # the main process has cleared the folder
    run, changes = _start(config, dist_info, device, data, state_path)
    steps = data.steps_per_epoch
    log = None
    if dist_info.main:
        _record_start(config, run, data, changes, dist_info.world, device)
        log = StepLog(config.folder, run.step)
        for warning in data.warnings:
            print(f"warning: {warning}", flush=True)
        if state_path is None and (random_start := _random_start_warning(config.model)):
            print(f"WARNING: {random_start}", flush=True)
        if state_path is not None and progress:
            listed = ", ".join(f"{key} {old!r} → {new!r}" for key, (old, new) in changes.items()) or "none"
            print(f"resuming {config.folder} after step {run.step} of {config.training.epochs * steps} "
                  f"({state_path.name}); config changes: {listed}", flush=True)
    try:
        for epoch in range(run.step // steps, config.training.epochs):
            if run.step < (epoch + 1) * steps and not _train_steps(config, run, data, epoch, device, log, stop,
                                                                   dist_info, progress):
                raise TrainingStopped(f"training stopped by {stop.requested} after step {run.step}; its state is in "
                                      f"{config.folder / 'state'}: continue with --resume")
            if len(run.history) <= epoch:
                _end_epoch(config, run, data, epoch, device, log, stop, dist_info, progress)
            if dist_info.world > 1:
                dist.barrier()
            if stop.requested is not None and epoch + 1 < config.training.epochs:
                raise TrainingStopped(f"training stopped by {stop.requested} after epoch {epoch + 1} (step "
                                      f"{run.step}); its state is in {config.folder / 'state'}: continue with --resume")
    except _WorkerLost as lost:
        if dist_info.world > 1:  # the other processes wait in a collective call: no state all can agree on
            raise
        # Raised between steps (or before the epoch's validation is recorded): the state is whole.
        _save_state(config, run, data, dist_info)
        raise TrainingStopped(f"training stopped by {stop.requested or lost} after step {run.step}; its state is in "
                              f"{config.folder / 'state'}: continue with --resume") from None
    finally:
        if log is not None:
            log.close()
        if dist_info.main and config.training.deterministic:
            _record_fallbacks(config.folder, fallbacks)
    return TrainResult(config.folder / "model.pt", run.best_epoch, run.best_auc, run.history)
