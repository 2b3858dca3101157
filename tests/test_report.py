"""report.md, metrics.json and the plots: every table names its data, every number its interval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from training.metrics import patient_level_metrics, slice_level_metrics
from training.model.rule import TriageRule
from training.report import (
    INTERVALS_NOTE,
    format_interval,
    plot_pr,
    plot_roc,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA = "held-out test split of DATA-X (1,234 slices)"
MODEL = "EffClass MODEL-Y"
INTERVAL = re.compile(r"\d\.\d{3} \(\d\.\d{3}–\d\.\d{3}\)")


@pytest.fixture(scope="module")
def slices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    return labels, np.clip(rng.random(200) * 0.6 + labels * 0.35, 0, 1), np.repeat(np.arange(20), 10)


@pytest.fixture(scope="module")
def tables(slices) -> tuple[dict, dict]:
    labels, probabilities, groups = slices
    slice_metrics = slice_level_metrics(labels, probabilities, groups=groups, resamples=100)
    studies = [probabilities[groups == g] for g in range(20)]
    study_labels = np.array([int(labels[groups == g].sum() >= 5) for g in range(20)])
    patient = patient_level_metrics(study_labels, studies, rule=TriageRule(), resamples=100)
    patient["rule_source"] = "the rule recommended by the checkpoint test.pt"
    return slice_metrics, patient


def _section(report: str, heading: str) -> str:
    """The lines from `heading` up to the next heading of any level."""
    start = report.index(heading)
    body = report.index("\n", start)
    following = re.search(r"^#", report[body:], re.MULTILINE)
    return report[start:body + following.start()] if following else report[start:]


def test_format_interval() -> None:
    assert format_interval({"estimate": 0.9123, "low": 0.89, "high": 0.9314, "method": "Wilson"}) == \
        "0.912 (0.890–0.931)"
    assert format_interval(None) == "n/a"
    assert format_interval({"estimate": None, "low": 0.0, "high": 1.0, "method": "Wilson"}) == "n/a"
    assert format_interval({"estimate": float("nan"), "low": 0.0, "high": 1.0, "method": "Wilson"}) == "n/a"
    assert format_interval({"estimate": 0.5, "low": None, "high": None, "method": "bootstrap"}) == \
        "0.500 (interval n/a)"


def test_report_has_both_tables_each_naming_its_data(tables, tmp_path: Path) -> None:
    slice_metrics, patient_metrics = tables
    files = write_report(tmp_path, slice_metrics=slice_metrics, patient_metrics=patient_metrics,
                         data_description=DATA, model_description=MODEL)
    assert files == {"metrics": tmp_path / "metrics.json", "report": tmp_path / "report.md"}
    report = files["report"].read_text()
    table_starts = [i for i, line in enumerate(report.splitlines()) if line.startswith("|") and
                    not report.splitlines()[i - 1].startswith("|")]
    assert len(table_starts) == 4
    headings = [line for line in report.splitlines() if line.startswith("### ")]
    assert len(headings) == 4 and all(line.endswith(f"measured on: {DATA}") for line in headings)
    for start in table_starts:  # the heading closest above each table names the data
        above = [line for line in report.splitlines()[:start] if line.startswith("#")][-1]
        assert above.endswith(f"measured on: {DATA}")
    assert "Table 1" in report and "Table 2" in report
    assert INTERVALS_NOTE in report and f"Model: {MODEL}" in report
    assert "Wilson" in INTERVALS_NOTE and "bootstrap percentile" in INTERVALS_NOTE


def _report_text(folder: Path, *, slice_metrics: dict | None = None, patient_metrics: dict | None = None) -> str:
    """report.md as written for one table family alone."""
    files = write_report(folder, slice_metrics=slice_metrics, patient_metrics=patient_metrics,
                         data_description=DATA, model_description=MODEL)
    return files["report"].read_text()


def _row(table: str, first_cell: str) -> str:
    """The line of a markdown table whose first cell is `first_cell`."""
    return next(line for line in table.splitlines() if line.startswith(f"| {first_cell} |"))


def test_slice_table_mirrors_the_papers_table_1(tables, tmp_path: Path) -> None:
    slice_metrics, _ = tables
    report = _report_text(tmp_path, slice_metrics=slice_metrics)
    assert "Table 2" not in report
    rates = _section(report, "### Table 1a")
    assert "| threshold | ACC | TPR | TNR | PPV | NPV | TP | FP | TN | FN |" in rates
    assert "200 slices from 20 patients" in rates
    for threshold in ("0.5", "0.7", "0.9"):
        row = _row(rates, f"p > {threshold}")
        assert len(INTERVAL.findall(row)) == 5
        cells = slice_metrics["thresholds"][threshold]
        assert row.endswith(f"| {cells['tp']} | {cells['fp']} | {cells['tn']} | {cells['fn']} |")
        assert format_interval(cells["sensitivity"]) in row
    areas = _section(report, "### Table 1b")
    for name, key in (("PR-AUC (average precision)", "average_precision"),
                      ("PR-AUC (trapezoid, as the paper's code)", "pr_auc_trapezoid"), ("ROC-AUC", "roc_auc")):
        assert f"| {name} | {format_interval(slice_metrics[key])} |" in areas
        assert INTERVAL.fullmatch(format_interval(slice_metrics[key]))
    assert "AUC intervals: bootstrap percentile, 100 resamples of whole patients." in areas


def test_patient_table_mirrors_the_papers_table_2(tables, tmp_path: Path) -> None:
    _, patient_metrics = tables
    report = _report_text(tmp_path, patient_metrics=patient_metrics)
    assert "Table 1" not in report
    rules = _section(report, "### Table 2a")
    assert "| rule | ACC | TPR | TNR | PPV | NPV | TP | FP | TN | FN |" in rules
    assert ("at least 1, have P(ICH) > 0.8 (slice threshold and minimum: the rule recommended by the "
            "checkpoint test.pt)") in rules
    for name in ("2.5 %", "5 %", "10 %"):
        row = _row(rules, name)
        assert row.count("|") == 11
    scores = _section(report, "### Table 2b")
    assert f"| max P(ICH) | {format_interval(patient_metrics['study_score_roc_auc'])} |" in scores
    assert f"| mean of the top 3 P(ICH) | {format_interval(patient_metrics['top3_mean_roc_auc'])} |" in scores
    method = patient_metrics["study_score_roc_auc"]["method"]
    assert method.startswith("bootstrap percentile, 100 resamples") and f"AUC intervals: {method}." in scores


def test_metrics_json_holds_everything(tables, tmp_path: Path) -> None:
    slice_metrics, patient_metrics = tables
    files = write_report(tmp_path / "new", slice_metrics=slice_metrics, patient_metrics=patient_metrics,
                         data_description=DATA, model_description=MODEL)
    saved = json.loads(files["metrics"].read_text())
    assert saved["data_description"] == DATA and saved["model_description"] == MODEL
    assert saved["slice_level"] == slice_metrics and saved["patient_level"] == patient_metrics
    assert saved["intervals"] == INTERVALS_NOTE and saved["curves"] == {}


def test_undefined_values_are_written_as_na_and_null(tmp_path: Path) -> None:
    one_class = slice_level_metrics(np.zeros(12, dtype=int), np.linspace(0, 0.95, 12), resamples=10)
    files = write_report(tmp_path, slice_metrics=one_class, patient_metrics=None, data_description=DATA,
                         model_description=MODEL)
    report = files["report"].read_text()
    assert "| ROC-AUC | n/a |" in report and "AUCs are undefined: only one class is present." in report
    assert json.loads(files["metrics"].read_text())["slice_level"]["roc_auc"] is None
    with pytest.raises(ValueError, match="Out of range float"):  # NaN is never written as invalid JSON
        write_report(tmp_path, slice_metrics={"n": float("nan")}, patient_metrics=None, data_description=DATA,
                     model_description=MODEL)


def test_report_refuses_numbers_without_their_data(tables, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_description must say what it describes, got ' '"):
        write_report(tmp_path, slice_metrics=tables[0], patient_metrics=None, data_description=" ",
                     model_description=MODEL)
    with pytest.raises(ValueError, match="model_description must say what it describes, got ''"):
        write_report(tmp_path, slice_metrics=tables[0], patient_metrics=None, data_description=DATA,
                     model_description="")


def test_plots_write_png_files(slices, tmp_path: Path) -> None:
    labels, probabilities, _ = slices
    roc = plot_roc(labels, probabilities, tmp_path / "roc.png", f"Slice level: {DATA}")
    pr = plot_pr(labels, probabilities, tmp_path / "pr.png", f"Slice level: {DATA}")
    assert (roc, pr) == (tmp_path / "roc.png", tmp_path / "pr.png")
    for path in (roc, pr):
        content = path.read_bytes()
        assert content.startswith(PNG_SIGNATURE) and len(content) > 10_000
    with pytest.raises(ValueError, match="title must say what it describes"):
        plot_roc(labels, probabilities, tmp_path / "untitled.png", "")
    assert not (tmp_path / "untitled.png").exists()
    with pytest.raises(ValueError, match="both classes"):
        plot_pr(np.ones(5), np.arange(5), tmp_path / "one_class.png", DATA)


def test_report_links_curves(slices, tables, tmp_path: Path) -> None:
    labels, probabilities, _ = slices
    curves = {"slice_roc": plot_roc(labels, probabilities, tmp_path / "slice_roc.png", DATA),
              "slice_pr": plot_pr(labels, probabilities, tmp_path / "slice_pr.png", DATA)}
    files = write_report(tmp_path, slice_metrics=tables[0], patient_metrics=None, data_description=DATA,
                         model_description=MODEL, curves=curves)
    assert files["slice_roc"] == curves["slice_roc"] and files["slice_pr"] == curves["slice_pr"]
    report = files["report"].read_text()
    assert "![slice_roc](slice_roc.png)" in report and "![slice_pr](slice_pr.png)" in report
    assert json.loads(files["metrics"].read_text())["curves"] == {"slice_roc": "slice_roc.png",
                                                                    "slice_pr": "slice_pr.png"}
