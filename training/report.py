"""Evaluation output: metrics.json, report.md (the paper's two tables) and ROC/PR plots.

Honesty rule: every table heading and every plot title names the data it was measured on;
a number never travels without its data and its interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from training.metrics import (
    PAPER_RULE_ROW,
    average_precision,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)

__all__ = ["INTERVALS_NOTE", "format_interval", "intervals_note", "plot_pr", "plot_reliability", "plot_roc",
           "write_report"]

COLUMNS = (("accuracy", "ACC"), ("sensitivity", "TPR"), ("specificity", "TNR"), ("ppv", "PPV"), ("npv", "NPV"))
INTERVAL_NAMES = {"wilson": "Wilson score", "clopper-pearson": "exact Clopper–Pearson"}


def intervals_note(method: str = "wilson") -> str:
    """How the report's intervals were made."""
    return (f"Intervals are 95 %: {INTERVAL_NAMES[method]} for proportions (ACC, TPR, TNR, PPV, NPV), "
            "bootstrap percentile for areas under curves and calibration errors.")


INTERVALS_NOTE = intervals_note()


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def format_interval(entry: Mapping[str, float | str | None] | None) -> str:
    """'0.912 (0.890–0.931)'; 'n/a' when undefined (one class only, or no cases)."""
    if entry is None or not _defined(entry["estimate"]):
        return "n/a"
    if not (_defined(entry["low"]) and _defined(entry["high"])):
        return f"{entry['estimate']:.3f} (interval n/a)"
    return f"{entry['estimate']:.3f} ({entry['low']:.3f}–{entry['high']:.3f})"


def _require_text(name: str, value: str) -> None:
    if not value.strip():
        raise ValueError(f"{name} must say what it describes, got {value!r}")


def _rate_table(rows: dict[str, dict], label: str) -> list[str]:
    lines = [f"| {label} | " + " | ".join(short for _, short in COLUMNS) + " | TP | FP | TN | FN |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    for name, cells in rows.items():
        values = " | ".join(format_interval(cells[key]) for key, _ in COLUMNS)
        lines.append(f"| {name} | {values} | {cells['tp']} | {cells['fp']} | {cells['tn']} | {cells['fn']} |")
    return lines


def _bootstrap_line(*entries: dict | None) -> str:
    """How the AUC intervals were made: the entries share labels, draws and seed, so one method."""
    methods = [entry["method"] for entry in entries if entry is not None]
    return f"AUC intervals: {methods[0]}." if methods else "AUCs are undefined: only one class is present."


def _slice_section(metrics: dict, data: str) -> list[str]:
    patients = "" if metrics.get("patients") is None else f" from {metrics['patients']} patients"
    areas = {"PR-AUC (average precision)": metrics["average_precision"],
             "PR-AUC (trapezoid, as the paper's code)": metrics["pr_auc_trapezoid"],
             "ROC-AUC": metrics["roc_auc"]}
    return [
        "## Table 1 — slice level (as the paper's Table 1)", "",
        f"### Table 1a. Slice classification at P(ICH) thresholds — measured on: {data}", "",
        (f"{metrics['n']} slices{patients}: {metrics['positives']} with ICH, {metrics['negatives']} without. "
         "A slice is called positive when P(ICH) > threshold."), "",
        *_rate_table({f"p > {t}": cells for t, cells in metrics["thresholds"].items()}, "threshold"), "",
        f"### Table 1b. Slice-level areas under curves — measured on: {data}", "",
        "| area | value (95 % interval) |", "|---|---|",
        *(f"| {name} | {format_interval(entry)} |" for name, entry in areas.items()), "",
        _bootstrap_line(*areas.values()), "",
    ]


def _patient_section(metrics: dict, data: str) -> list[str]:
    scores = {"max P(ICH)": metrics["study_score_roc_auc"], "mean of the top 3 P(ICH)": metrics["top3_mean_roc_auc"]}
    return [
        "## Table 2 — patient level (as the paper's Table 2)", "",
        f"### Table 2a. Patient classification by the n % rule — measured on: {data}", "",
        (f"{metrics['n']} studies: {metrics['positives']} with ICH, {metrics['negatives']} without. "
         "A study is called positive when at least n % of its slices, and at least "
         f"{metrics['min_positive_slices']}, have P(ICH) > {metrics['slice_threshold']:g} "
         f"(slice threshold and minimum: {metrics.get('rule_source') or 'as given'})."), "",
        *_rate_table({(name if name == PAPER_RULE_ROW else name.replace("%", " %")): cells
                      for name, cells in metrics["rules"].items()}, "rule"), "",
        f"### Table 2b. Study-score ROC-AUC — measured on: {data}", "",
        "| study score | ROC-AUC (95 % interval) |", "|---|---|",
        *(f"| {name} | {format_interval(entry)} |" for name, entry in scores.items()), "",
        _bootstrap_line(*scores.values()), "",
    ]


def _abstention_section(metrics: dict, data: str) -> list[str]:
    """How often the node would answer NOT TRIAGED, and Table 2 on the studies it would triage."""
    rate = format_interval(metrics["rate"]) if metrics["rate"] else "-"
    lines = [f"## Not triaged — the node's scope and out-of-distribution checks — measured on: {data}", "",
             f"{metrics['not_triaged']} of {metrics['studies']} studies would be NOT TRIAGED: {rate}. "
             f"{metrics['with_ich_not_triaged']} of the {metrics['with_ich']} studies with ICH among them "
             "(they reach the radiologist unprioritised, as if no triage had run).", "",
             f"- Scope: {metrics['scope']}",
             f"- Out-of-distribution check: {metrics['input_profile'] or 'none (the checkpoint has no input profile)'}"]
    if metrics["scope_not_checked"]:
        lines.append(f"- {metrics['scope_not_checked']} studies had DICOM files missing or unreadable: their scope "
                     "was not checked (see the warnings)")
    lines += ["", "| studies | count | not triaged (95 % interval) |", "|---|---|---|"]
    lines += [f"| {kind} | {entry['studies']} | {entry['not_triaged']}: {format_interval(entry['rate'])} |"
              for kind, entry in metrics["by_kind"].items()]
    if metrics["by_reason"]:
        lines += ["", "| reason | studies |", "|---|---|", *(f"| {code} | {count} |"
                                                            for code, count in metrics["by_reason"].items())]
    lines.append("")
    triaged = metrics.get("patient_level_triaged")
    if triaged is not None:
        lines += [line.replace("## Table 2 — patient level", "## Table 2 on the studies the node would triage", 1)
                  for line in _patient_section(triaged, f"{data}, only the studies that would be triaged")]
    return lines


def _localisation_section(metrics: dict, data: str) -> list[str]:
    return [
        f"## Grad-CAM localisation — measured on: {data}", "",
        (f"Key slices are the {metrics['key_slices_per_study']} most suspicious slices of a study, as the node "
         f"shows them. Of the true-positive key slices (bleeding, P(ICH) > {metrics['slice_threshold']:g}) of "
         f"{metrics['positive_studies']} studies with ICH, this share has its Grad-CAM peak (at "
         f"`{metrics['gradcam_layer']}`) inside the bleed "
         f"mask dilated by half a Grad-CAM cell ({metrics['margin_pixels']:g} of the {metrics['input_size']} "
         f"input pixels; the map has one value per {metrics['gradcam_cell_pixels']:g} pixels, so its peak "
         "cannot be placed more finely):"), "",
        "| true-positive key slices | peak inside | share (95 % interval) |", "|---|---|---|",
        (f"| {metrics['true_positive_key_slices']} | {metrics['peak_inside']} "
         f"| {format_interval(metrics['fraction'])} |"),
        "",
    ]


def _calibration_section(metrics: dict, data: str) -> list[str]:
    rows = [f"| {b['low']:.1f}–{b['high']:.1f} | {b['n']} | "
            + (f"{b['mean_probability']:.3f} | {b['fraction_positive']:.3f} |" if b["n"] else "– | – |")
            for b in metrics["reliability"]]
    return [
        f"## Calibration — slice level, measured on: {data}", "",
        (f"{metrics['n']} slices, {metrics['prevalence']:.1%} with ICH (calibration depends on prevalence: on a "
         "balanced list P(ICH) reads as at 50 % prevalence). Brier score "
         f"{format_interval(metrics['brier'])}; expected calibration error over {metrics['bins']} equal-width bins "
         f"{format_interval(metrics['ece'])}."), "",
        "| P(ICH) bin | slices | mean P(ICH) | share with ICH |", "|---|---|---|---|", *rows, "",
    ]


def _subtype_section(table: dict, data: str) -> list[str]:
    thresholds = list(next(iter(table.values()))["thresholds"]) if table else []
    lines = [f"## Sensitivity by bleed subtype — slice level, measured on: {data}", "",
             "Share of the slices showing each subtype that are called positive (P(ICH) > threshold); a slice with "
             "several subtypes counts for each.", "",
             "| subtype | slices | " + " | ".join(f"p > {t}" for t in thresholds) + " |",
             "|---" * (len(thresholds) + 2) + "|"]
    for name, entry in table.items():
        lines.append(f"| {name} | {entry['slices']} | "
                     + " | ".join(format_interval(entry["thresholds"][t]) for t in thresholds) + " |")
    return [*lines, ""]


def _relative(path: Path, out_dir: Path) -> str:
    """Links in report.md work when the folder is moved: paths inside it are made relative."""
    return str(path.relative_to(out_dir)) if path.is_relative_to(out_dir) else str(path)


def write_report(
    out_dir: Path,
    *,
    slice_metrics: dict | None,
    patient_metrics: dict | None,
    data_description: str,
    model_description: str,
    localisation_metrics: dict | None = None,
    calibration_metrics: dict | None = None,
    subtype_metrics: dict | None = None,
    abstention_metrics: dict | None = None,
    warnings: list[str] | None = None,
    interval: str = "wilson",
    curves: dict[str, Path] | None = None,
) -> dict[str, Path]:
    """Write metrics.json (everything) and report.md (the two tables, calibration, the
    subtypes and the warnings about the data) under `out_dir`.

    `curves` names plots already written (e.g. by plot_roc); they are linked from the
    report, listed in metrics.json and returned with the other paths.
    """
    _require_text("data_description", data_description)
    _require_text("model_description", model_description)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = {name: Path(path) for name, path in (curves or {}).items()}
    paths = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md", **curves}
    note = intervals_note(interval)
    payload = {"data_description": data_description, "model_description": model_description,
               "intervals": note, "warnings": list(warnings or []), "slice_level": slice_metrics,
               "patient_level": patient_metrics, "calibration": calibration_metrics,
               "subtype_sensitivity": subtype_metrics, "gradcam_localisation": localisation_metrics,
               "not_triaged": abstention_metrics,
               "curves": {name: _relative(path, out_dir) for name, path in curves.items()}}
    # allow_nan=False: NaN is not JSON; metrics carry undefined values as null.
    paths["metrics"].write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    lines = ["# Evaluation", "", f"- Model: {model_description}", f"- Data: {data_description}",
             f"- {note}", ""]
    if warnings:
        lines += ["## Warnings about the data", "", *(f"- {warning}" for warning in warnings), ""]
    if slice_metrics is not None:
        lines += _slice_section(slice_metrics, data_description)
    if patient_metrics is not None:
        lines += _patient_section(patient_metrics, data_description)
    if calibration_metrics is not None:
        lines += _calibration_section(calibration_metrics, data_description)
    if subtype_metrics:
        lines += _subtype_section(subtype_metrics, data_description)
    if abstention_metrics is not None:
        lines += _abstention_section(abstention_metrics, data_description)
    if localisation_metrics is not None:
        lines += _localisation_section(localisation_metrics, data_description)
    if curves:
        lines += ["## Curves", "", *(f"![{name}]({_relative(path, out_dir)})" for name, path in curves.items()), ""]
    paths["report"].write_text("\n".join(lines))
    return paths


def _figure(title: str) -> tuple[Figure, Axes]:
    """A pyplot-free figure: no global backend state, safe in worker threads."""
    _require_text("title", title)
    figure = Figure(figsize=(6, 6))
    axes = figure.subplots()
    figure.suptitle(title, fontsize=8, wrap=True)
    return figure, axes


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> Path:
    """ROC curve with its AUC and the chance diagonal, as PNG. `title` must name the data."""
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = _figure(title)
    axes.plot(fpr, tpr, label=f"ROC-AUC = {roc_auc(labels, scores):.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set(xlabel="1 − specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=100, format="png")
    return Path(path)


def plot_pr(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> Path:
    """Precision–recall curve (step-wise, as AP integrates it) with AP and prevalence, as PNG.
    `title` must name the data."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    figure, axes = _figure(title)
    axes.step(recall, precision, where="post", label=f"AP = {average_precision(labels, scores):.3f}")
    prevalence = float(np.mean(np.asarray(labels, dtype=np.float64)))
    axes.axhline(prevalence, linestyle="--", color="grey", label=f"prevalence = {prevalence:.3f}")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower left")
    figure.savefig(path, dpi=100, format="png")
    return Path(path)


def plot_reliability(calibration: dict, path: Path, title: str) -> Path:
    """Reliability plot: share with ICH against mean P(ICH) per bin, the diagonal for a
    calibrated model, and the slices per bin. `title` must name the data."""
    figure, axes = _figure(title)
    used = [b for b in calibration["reliability"] if b["n"]]
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    axes.plot([b["mean_probability"] for b in used], [b["fraction_positive"] for b in used], marker="o",
              label=f"ECE = {calibration['ece']['estimate']:.3f}, Brier = {calibration['brier']['estimate']:.3f}")
    for b in used:
        axes.annotate(str(b["n"]), (b["mean_probability"], b["fraction_positive"]), fontsize=7,
                      textcoords="offset points", xytext=(4, -10))
    axes.set(xlabel="mean P(ICH) in the bin", ylabel="share of slices with ICH", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="upper left")
    figure.savefig(path, dpi=100, format="png")
    return Path(path)
