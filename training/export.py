"""`ichnode export`: a checkpoint as an ONNX model, checked against PyTorch, and its model card.

The ONNX file (opset 17, batch of any size) takes what the checkpoint's preprocessing makes
of a slice and gives the two logits; P(ICH) is softmax(logits)[:, 1]. Before it is kept it
is run by ONNX Runtime on synthetic phantom slices beside the PyTorch model, and refused
if P(ICH) differs by more than `tolerance`. The model card is rendered from the
checkpoint's own config, one section per part of it, so a part added to the config later
appears in the card without a change here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.atomic import atomic_write
from training.errors import InferenceError
from training.model.checkpoint import ModelConfig, checkpoint_digest, load_checkpoint
from training.model.preprocess import hu_to_input
from training.phantom import SUBTYPES, random_bleed, random_head, render_slice

__all__ = ["ExportResult", "export", "model_card", "sample_inputs"]

OPSET = 17
SECTION_TITLES = {"architecture": "Architecture", "preprocess": "Input and preprocessing",
                  "triage": "Recommended triage rule", "provenance": "Provenance",
                  "scope": "What it supports (studies outside it are NOT TRIAGED)",
                  "inputs": "Its training inputs (a study unlike them is NOT TRIAGED)"}
INTENDED_USE = (
    "Triage of non-contrast axial head CT for intracranial hemorrhage: a study the model flags is read "
    "sooner; every other study is read as usual. It answers only for the studies its scope declares{profiled}; "
    "any other study is NOT TRIAGED. It is not a medical device and not a diagnosis; no output replaces a "
    "radiologist's read. Before its flags reach anyone, validate it on the site's own studies in a silent trial "
    "(docs/validation.md in the ichnode repository).")
# What the card says in place of a profile: the node then abstains on scope alone.
NO_INPUT_PROFILE = ("No input profile: out-of-distribution abstention is off. A study within the scope above but "
                    "unlike the training inputs is not recognised and gets a triage result like any other; "
                    "`ichnode fit-ood` writes a profile into the checkpoint.")


@dataclass(frozen=True)
class ExportResult:
    onnx: Path
    card: Path
    samples: int
    max_difference: float  # largest |P(ICH) ONNX − P(ICH) PyTorch| on the samples


def sample_inputs(config: ModelConfig, count: int = 4, seed: int = 0) -> np.ndarray:
    """`count` synthetic phantom slices (half with a bleed) through the checkpoint's own
    preprocessing: inputs of the range and structure the model sees, made without data."""
    rng = np.random.default_rng(seed)
    coords = (np.arange(512) - 255.5) * 0.45
    x, y = np.meshgrid(coords, coords)
    inputs = []
    for index in range(count):
        head = random_head(rng)
        c = head.semi_axes[2]
        bleeds = [random_bleed(rng, head, SUBTYPES[index % len(SUBTYPES)], (-0.2 * c, 0.6 * c))] if index % 2 else []
        z = bleeds[0].centre[2] if bleeds else rng.uniform(-0.2 * c, 0.6 * c)
        hu, _ = render_slice(head, bleeds, x, y, float(z), rng)
        inputs.append(hu_to_input(hu, config.preprocess))
    return np.stack(inputs).astype(np.float32)


def _probability(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return (np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True))[:, 1]


def export(checkpoint: Path, out: Path, *, samples: int = 4, tolerance: float = 1e-4) -> ExportResult:
    """Write `out`/model.onnx and `out`/MODEL_CARD.md for `checkpoint`; refuse an ONNX model
    that does not agree with PyTorch on `samples` phantom slices."""
    import onnxruntime as ort

    model, config = load_checkpoint(checkpoint)
    inputs = sample_inputs(config, samples)
    with torch.inference_mode():
        expected = _probability(model(torch.from_numpy(inputs)).numpy())
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():  # tracing notes about shape checks: expected
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.from_numpy(inputs[:1]), buffer, opset_version=OPSET, dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": inputs})
    difference = float(np.max(np.abs(_probability(logits) - expected)))
    if not difference <= tolerance:
        raise InferenceError(f"the ONNX export of {checkpoint} gives P(ICH) up to {difference:.2e} away from "
                             f"PyTorch's on {samples} phantom slices (tolerance {tolerance:g}); nothing was written")
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, card_path = out / "model.onnx", out / "MODEL_CARD.md"
    # Exports are made to be shared: readable by others as the umask allows.
    atomic_write(onnx_path, lambda handle: handle.write(buffer.getvalue()), shared=True)
    check = {"file": onnx_path.name, "opset": OPSET, "samples": samples, "max_difference": difference,
             "tolerance": tolerance}
    card = model_card(config, checkpoint=Path(checkpoint), sha256=checkpoint_digest(checkpoint), onnx=check)
    atomic_write(card_path, lambda handle: handle.write(card.encode()), shared=True)
    return ExportResult(onnx_path, card_path, samples, difference)


def _cell(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every leaf of nested dataclasses and dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        rows = []
        for key, item in value.items():
            rows += _rows(item, f"{prefix}.{key}" if prefix else str(key))
        return rows or [(prefix, "(none)")]
    if isinstance(value, np.ndarray):  # a profile's mean or matrix: its shape says enough
        return [(prefix, f"float array {list(value.shape)}")]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) or dataclasses.is_dataclass(v)
                                                          for v in value):
        return [row for i, item in enumerate(value) for row in _rows(item, f"{prefix}[{i}]")]
    return [(prefix, value)]


def _section(name: str, value: Any) -> list[str]:
    title = SECTION_TITLES.get(name, name.replace("_", " ").capitalize())
    rows = _rows(value)
    if rows == [("", value)]:  # a plain value, not a table
        return [f"## {title}", "", f"`{_cell(value)}`", ""]
    return [f"## {title}", "", "| | |", "|---|---|", *(f"| `{key}` | {_cell(item)} |" for key, item in rows), ""]


def _warnings(config: ModelConfig) -> list[str]:
    provenance = config.provenance
    if provenance.synthetic:
        return ["**DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE.** Trained on synthetic phantoms only: "
                "no figure below says anything about real head CT."]
    if provenance.untrained:
        return ["**UNTRAINED MODEL.** Random weights: its outputs mean nothing."]
    return []


def model_card(config: ModelConfig, *, checkpoint: Path, sha256: str, onnx: dict | None = None) -> str:
    """The checkpoint's model card, as Markdown: what it is, what it is for, then each part
    of its config (architecture, preprocessing, rule, provenance with its metrics and the
    training record, and whatever part a later config adds)."""
    provenance = config.provenance
    lines = [f"# Model card: `{checkpoint.name}`", "", *_warnings(config), "",
             "| | |", "|---|---|",
             f"| architecture | `{config.architecture}` |",
             f"| trained on | {_cell(provenance.training_data)}: {_cell(provenance.description)} |",
             f"| created | {provenance.created} by {provenance.code_version} |",
             f"| checkpoint SHA-256 | `{sha256}` |", "",
             "## Intended use", "",
             INTENDED_USE.format(profiled=" and that resemble its training inputs" if config.inputs else ""), "",
             "Every figure in this card names the data it was measured on (`measured_on`); figures measured on "
             "synthetic phantoms are not clinical performance.", ""]
    if onnx is not None:
        lines += ["## ONNX export", "",
                  (f"`{onnx['file']}` (opset {onnx['opset']}): input `input` float32 [batch, 3, "
                   f"{config.preprocess.input_size}, {config.preprocess.input_size}] as the preprocessing below "
                   "makes it, output `logits` [batch, 2]; P(ICH) = softmax(logits)[:, 1]. Checked with ONNX "
                   f"Runtime against PyTorch on {onnx['samples']} synthetic phantom slices: P(ICH) differed by at "
                   f"most {onnx['max_difference']:.1e} (tolerance {onnx['tolerance']:g})."), ""]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "inputs" and value is None:
            lines += ["## Its training inputs: no profile", "", NO_INPUT_PROFILE, ""]
        else:
            lines += _section(field.name, value)
    return "\n".join(lines)
