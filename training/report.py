"""Evaluation output: metrics.json, report.md (the paper's two tables) and ROC/PR plots.

Every table heading names the data it was measured on; a number never travels alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from training.metrics import average_precision, precision_recall_curve, roc_auc, roc_curve

__all__ = ["format_interval", "write_report", "plot_roc", "plot_pr"]

COLUMNS = (("accuracy", "ACC"), ("sensitivity", "TPR"), ("specificity", "TNR"), ("ppv", "PPV"), ("npv", "NPV"))
INTERVALS_NOTE = ("95 % intervals: Wilson score for proportions; percentile bootstrap for areas under "
                  "curves (slice level: whole patients resampled).")


def format_interval(entry: dict | None) -> str:
    """'0.912 (0.890–0.931)'; 'n/a' when undefined (one class only, or no cases)."""
    if entry is None or entry["estimate"] is None or math.isnan(entry["estimate"]):
        return "n/a"
    return f"{entry['estimate']:.3f} ({entry['low']:.3f}–{entry['high']:.3f})"


def _table(rows: dict[str, dict], label: str) -> list[str]:
    lines = [f"| {label} | " + " | ".join(short for _, short in COLUMNS) + " | TP | FP | TN | FN |",
             "|---" * (len(COLUMNS) + 5) + "|"]
    for name, cells in rows.items():
        values = " | ".join(format_interval(cells[key]) for key, _ in COLUMNS)
        lines.append(f"| {name} | {values} | {cells['tp']} | {cells['fp']} | {cells['tn']} | {cells['fn']} |")
    return lines


def _slice_section(metrics: dict, data: str) -> list[str]:
    lines = [f"## Slice level (as the paper's Table 1) — measured on: {data}", "",
             f"{metrics['n']} slices: {metrics['positives']} with ICH, {metrics['negatives']} without.", ""]
    lines += _table({f"p > {t}": cells for t, cells in metrics["thresholds"].items()}, "threshold")
    lines += ["", "| area | value (95 % interval) |", "|---|---|",
              f"| PR-AUC (average precision) | {format_interval(metrics['average_precision'])} |",
              f"| PR-AUC (trapezoid, as the paper's code) | {format_interval(metrics['pr_auc_trapezoid'])} |",
              f"| ROC-AUC | {format_interval(metrics['roc_auc'])} |", ""]
    return lines


def _patient_section(metrics: dict, data: str) -> list[str]:
    lines = [f"## Patient level (as the paper's Table 2) — measured on: {data}", "",
             f"{metrics['n']} patients or studies: {metrics['positives']} with ICH, {metrics['negatives']} without. "
             f"A study is positive when at least n % of its slices (and at least one) have P(ICH) > "
             f"{metrics['slice_threshold']}.", ""]
    lines += _table({name.replace("%", " %"): cells for name, cells in metrics["rules"].items()}, "rule")
    lines += ["", "| study score | ROC-AUC (95 % interval) |", "|---|---|",
              f"| max P(ICH) | {format_interval(metrics['study_score_roc_auc'])} |",
              f"| mean of the top 3 P(ICH) | {format_interval(metrics['top3_mean_roc_auc'])} |", ""]
    return lines


def write_report(out_dir: Path, *, slice_metrics: dict | None, patient_metrics: dict | None,
                 data_description: str, model_description: str) -> dict[str, Path]:
    """Write metrics.json and report.md under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out_dir / "metrics.json", "report": out_dir / "report.md"}
    payload = {"data": data_description, "model": model_description, "slice_level": slice_metrics,
               "patient_level": patient_metrics, "intervals": INTERVALS_NOTE}
    paths["metrics"].write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    lines = ["# Evaluation", "", f"- Model: {model_description}", f"- Data: {data_description}",
             f"- {INTERVALS_NOTE}", ""]
    if slice_metrics is not None:
        lines += _slice_section(slice_metrics, data_description)
    if patient_metrics is not None:
        lines += _patient_section(patient_metrics, data_description)
    paths["report"].write_text("\n".join(lines) + "\n")
    return paths


def _figure(title: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 6))
    axes = figure.subplots()
    figure.suptitle(title, fontsize=8, wrap=True)
    return figure, axes


def plot_roc(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> None:
    fpr, tpr, _ = roc_curve(labels, scores)
    figure, axes = _figure(title)
    axes.plot(fpr, tpr, label=f"ROC-AUC {roc_auc(labels, scores):.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    figure.savefig(path, dpi=100)


def plot_pr(labels: np.ndarray, scores: np.ndarray, path: Path, title: str) -> None:
    precision, recall, _ = precision_recall_curve(labels, scores)
    figure, axes = _figure(title)
    axes.step(recall, precision, where="post", label=f"average precision {average_precision(labels, scores):.3f}")
    prevalence = float(np.mean(labels))
    axes.axhline(prevalence, linestyle="--", color="grey", label=f"prevalence {prevalence:.2f}")
    axes.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower left")
    figure.savefig(path, dpi=100)
