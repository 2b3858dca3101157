"""Site validation: the node's own analyses, from its triage log, against the site's
reference labels (`ichnode evaluate --history --labels labels.csv`).

A model trained elsewhere must be checked on the site's own scanners and patients before
anyone relies on its flags. The site exports what its radiologists concluded, one row per
study, keyed by StudyInstanceUID or AccessionNumber; this module joins that with the latest
`analysed` event of each study (run in a silent trial, or live) and reports the paper's
Table 2 with intervals, plus the node's own verdicts as they were given. Nothing here is a
figure about the model in general: it is this site, these studies, this period.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.errors import DataError
from node.triagelog import LogReader
from training.calibrate import OperatingPoint, operating_point
from training.metrics import ConfusionMatrix, patient_level_metrics
from training.model.checkpoint import checkpoint_digest
from training.model.rule import TriageRule
from training.report import write_report

__all__ = ["ReferenceLabels", "Matched", "SiteJoin", "join_history", "site_evaluation", "site_operating_point"]

_YES = {"yes", "y", "true", "1", "positive", "ich"}
_NO = {"no", "n", "false", "0", "negative", "none"}
_KEYS = ("study_instance_uid", "accession_number")


@dataclass(frozen=True)
class ReferenceLabels:
    """The site's reference standard: ICH yes or no, by StudyInstanceUID or AccessionNumber."""

    by_uid: dict[str, bool]
    by_accession: dict[str, bool]

    @classmethod
    def read(cls, path: Path) -> "ReferenceLabels":
        """A CSV with an `ich` column (yes/no, true/false, 1/0, positive/negative) and a
        `study_instance_uid` or `accession_number` column (or both). DataError names the
        file, line and value that cannot be used."""
        try:
            handle = open(path, newline="", encoding="utf-8-sig")
        except OSError as exc:
            raise DataError(f"cannot read the labels {path}: {exc.strerror or exc}") from exc
        by_key: dict[str, dict[str, bool]] = {key: {} for key in _KEYS}
        with handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            if "ich" not in columns or not set(_KEYS) & set(columns):
                raise DataError(f"{path}: the first line must name an `ich` column and a `study_instance_uid` or "
                                f"`accession_number` column, got {', '.join(columns) or 'nothing'}")
            for row in reader:
                line = reader.line_num
                row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
                value = row.get("ich", "").lower()
                if value not in _YES | _NO:
                    raise DataError(f"{path} line {line}: ich must be yes or no (or true/false, 1/0), "
                                    f"got {row.get('ich', '')!r}")
                keys = [key for key in _KEYS if row.get(key)]
                if not keys:
                    raise DataError(f"{path} line {line}: neither study_instance_uid nor accession_number is given")
                for key in keys:
                    known = by_key[key].setdefault(row[key], value in _YES)
                    if known != (value in _YES):
                        raise DataError(f"{path} line {line}: {key} {row[key]} is labelled both yes and no")
        return cls(by_key["study_instance_uid"], by_key["accession_number"])

    def __len__(self) -> int:
        return max(len(self.by_uid), len(self.by_accession))


@dataclass(frozen=True)
class Matched:
    study_instance_uid: str
    accession_number: str
    label: bool
    positive: bool  # what the node said
    probabilities: tuple[float, ...]
    rule: TriageRule
    joined_by: str  # "study_instance_uid" or "accession_number"
    time: str  # of the analysis, ISO 8601 UTC as the log writes it


@dataclass(frozen=True)
class SiteJoin:
    matched: list[Matched]
    unlabelled: list[tuple[str, str]]  # analysed studies with no label: (uid, accession)
    not_analysed: list[str]  # labels (UID or accession) no analysis matched
    without_probabilities: int  # analyses logged before slice probabilities were recorded
    not_triaged: list[tuple[str, bool]] = field(default_factory=list)  # labelled, given no verdict: (uid, label)


def join_history(events: list[dict], labels: ReferenceLabels, *, model_sha256: str | None = None) -> SiteJoin:
    """The latest analysis of each study joined with its label, by UID first, else by
    accession number; with `model_sha256`, only analyses made by that checkpoint file."""
    latest = {e.get("study_instance_uid", ""): e for e in events if e.get("event") == "analysed"
              and (model_sha256 is None or e.get("model_sha256") == model_sha256)}
    matched, unlabelled, used, without, not_triaged = [], [], set(), 0, []
    for uid, event in latest.items():
        accession = str(event.get("accession_number") or "")
        if uid in labels.by_uid:
            label, joined_by, used_key = labels.by_uid[uid], "study_instance_uid", ("uid", uid)
        elif accession and accession in labels.by_accession:
            label, joined_by, used_key = labels.by_accession[accession], "accession_number", ("acc", accession)
        else:
            unlabelled.append((uid, accession))
            continue
        used.add(used_key)
        if event.get("triaged") is False:  # NOT TRIAGED: no verdict to score
            not_triaged.append((uid, label))
            continue
        probabilities = event.get("slice_probabilities")
        if not probabilities:
            without += 1
            continue
        rule = TriageRule(float(event.get("slice_threshold", 0.8)), float(event.get("positive_fraction", 0.05)),
                          int(event.get("min_positive_slices", 1)))
        matched.append(Matched(uid, accession, label, bool(event.get("positive")),
                               tuple(float(p) for p in probabilities), rule, joined_by, str(event.get("time", ""))))
    matched_uids = {m.study_instance_uid for m in matched}
    matched_accessions = {m.accession_number for m in matched}
    not_analysed = [u for u in labels.by_uid if ("uid", u) not in used and u not in matched_uids]
    not_analysed += [a for a in labels.by_accession if ("acc", a) not in used and a not in matched_accessions]
    return SiteJoin(matched, unlabelled, sorted(set(not_analysed)), without, not_triaged)


def site_evaluation(log_path: Path, labels_path: Path, out: Path, *, resamples: int = 2000) -> tuple[SiteJoin, dict]:
    """Join, compute Table 2 and write metrics.json and report.md under `out`; returns the
    join and the paths written. DataError when nothing could be matched."""
    labels = ReferenceLabels.read(labels_path)
    joined = join_history(LogReader(log_path).read(), labels)
    if not joined.matched:
        raise DataError(f"no analysed study in {log_path} matches a label in {labels_path} "
                        f"({len(joined.unlabelled)} analyses without a label, {len(joined.not_analysed)} labels "
                        "without an analysis): check the identifiers")
    rule = max(joined.matched, key=lambda m: m.time).rule  # the rule in force most recently
    truth = np.array([m.label for m in joined.matched])
    metrics = patient_level_metrics(truth, [np.array(m.probabilities) for m in joined.matched], rule=rule,
                                    resamples=resamples)
    said = ConfusionMatrix.from_predictions(truth, np.array([m.positive for m in joined.matched]))
    metrics["rules"] = {"as the node said": said.as_dict(), **metrics["rules"]}
    metrics["rule_source"] = "the rule recorded with the latest analysis"
    metrics["join"] = {"matched": len(joined.matched),
                       "by_study_instance_uid": sum(m.joined_by == "study_instance_uid" for m in joined.matched),
                       "by_accession_number": sum(m.joined_by == "accession_number" for m in joined.matched),
                       "analyses_without_label": len(joined.unlabelled), "labels_without_analysis": len(joined.not_analysed),
                       "analyses_without_slice_probabilities": joined.without_probabilities,
                       "not_triaged": len(joined.not_triaged),
                       "not_triaged_with_ich": sum(label for _, label in joined.not_triaged)}
    data = (f"this site's studies as the node analysed them ({log_path.name}), against the reference labels in "
            f"{labels_path.name}: {len(joined.matched)} studies given a verdict"
            + (f" ({len(joined.not_triaged)} more NOT TRIAGED, {metrics['join']['not_triaged_with_ich']} of them with "
               "ICH, are not in the tables)" if joined.not_triaged else ""))
    paths = write_report(out, slice_metrics=None, patient_metrics=metrics, data_description=data,
                         model_description="the node's recorded analyses (the model and rule in force at the time)")
    return joined, paths


def site_operating_point(log_path: Path, labels_path: Path, checkpoint: Path, *, target: float,
                         positive_fraction: float, min_positive_slices: int,
                         resamples: int) -> tuple[SiteJoin, OperatingPoint]:
    """The operating point chosen on the site's own analyses by `checkpoint` (the same file,
    by SHA-256) and its reference labels."""
    joined = join_history(LogReader(log_path).read(), ReferenceLabels.read(labels_path),
                          model_sha256=checkpoint_digest(checkpoint))
    if not joined.matched:
        raise DataError(f"no analysis in {log_path} made by {checkpoint} (the same file) matches a label in "
                        f"{labels_path}")
    data = (f"this site's studies as the node analysed them with {checkpoint.name} ({log_path.name}), against "
            f"the reference labels in {labels_path.name}")
    try:
        point = operating_point(np.array([m.label for m in joined.matched]),
                                [np.array(m.probabilities) for m in joined.matched], target=target, data=data,
                                positive_fraction=positive_fraction, min_positive_slices=min_positive_slices,
                                resamples=resamples)
    except ValueError as exc:
        raise DataError(f"cannot calibrate on the site's history: {exc}") from exc
    return joined, point
