"""The pictures docs/results.md shows: Secondary Captures of two synthetic studies (one
with a bleed, one without) analysed by the demonstration model on the CPU, and a NOT
TRIAGED picture whose reason carries the symbols the node burns in (≥, ²), as small PNGs.

    python -m demo.pictures --out docs/images --prefix after
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from node.analysis import AnalysisSettings, analyse
from node.output import ResultKind
from node.render import not_triaged_image
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model.scope import metal_reason
from training.model.series import SliceHeader, read_header
from training.synthetic import SyntheticOptions, write_studies

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
CHECKPOINT = REPO / "models" / "effclass-synthetic-demo.pt"
SEED = 3  # a seed the demonstration model never trained on
WIDTH = 640  # PNG width in pixels: small enough for the docs, large enough to read


def _read(header: SliceHeader) -> pydicom.Dataset:
    return pydicom.dcmread(header.path)


def _save(pixels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(pixels)
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    image.save(path, optimize=True)
    print(path, f"{path.stat().st_size // 1024} KB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--prefix", default="pictures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor.from_checkpoint(CHECKPOINT, device=Device("cpu"), batch_size=8)
    settings = AnalysisSettings(rule=predictor.config.triage, min_slices=10, max_unusable_fraction=0.1,
                                key_slices=1, aug_smooth=False, objects=(ResultKind.SC,), manufacturer="ichnode",
                                institution_name="", device_uid="1.2.826.0.1.3680043.8.498.7",
                                device_name="ICHNODE")
    with tempfile.TemporaryDirectory() as folder:
        labels = write_studies(folder, SyntheticOptions(studies=2, seed=SEED, positive_fraction=0.5,
                                                        min_slices=24, max_slices=28))
        for label in labels:
            study = Path(folder) / label.folder
            headers = [read_header(path) for path in sorted(study.rglob("*.dcm"))]
            result = analyse(headers, _read, predictor, settings, series_number=9900)
            truth = "bleed" if label.positive else "no-bleed"
            print(truth, result.label, f"max P(ICH) {result.probabilities.max():.3f}")
            _save(result.objects[ResultKind.SC][0].pixel_array, args.out / f"{args.prefix}-{truth}.png")
    reason = metal_reason([22.0, None, 31.0])
    picture = not_triaged_image(verdict_line="AI ICH TRIAGE: NOT TRIAGED", reasons=[reason.text],
                                facts=["Series: the axial series with the most slices.",
                                       "The middle slice: 142 cm² enclosed by bone."], warnings=[])
    _save(picture, args.out / f"{args.prefix}-not-triaged.png")


if __name__ == "__main__":
    main()
