"""`ichnode evaluate`: the paper's Table 1 (slice level) and Table 2 (patient level), with
95 % confidence intervals (Wilson, or Clopper–Pearson as the paper's Table 2), calibration,
sensitivity by bleed subtype, on held-out data — and every number names that data.

Each study also goes through the node's checks (its scope, then its out-of-distribution
score): the report gives how often the node would not triage, and Table 2 again on the
studies it would, beside Table 2 on them all.
"""

from __future__ import annotations

import csv
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from tqdm import tqdm

from training.datasets import EvalSet, EvalSlice, EvalStudy, load_eval_set
from training.errors import NoAnalysableSeries
from training.model.preprocess import hu_from_dataset
from training.model.scope import Reason, ReasonCode, Scope, metal_depth_mm, metal_reason, scope_reasons
from training.model.series import SliceHeader, choose_head_series, read_header
from training.localisation import dilate, mask_to_input, peak_inside
from training.metrics import (
    calibration_metrics,
    patient_level_metrics,
    slice_level_metrics,
    subtype_sensitivity,
    wilson_interval,
)
from training.inference.predictor import Predictor
from training.inference.settings import Backend, Device
from training.model.layers import GradcamLayer
from training.model.rule import TriageRule, key_slice_indices
from training.report import plot_pr, plot_reliability, plot_roc, write_report

__all__ = ["SYNTHETIC_NOTE", "EvaluationResult", "StudyCheck", "data_description", "data_warnings", "infer_slices",
           "predict_slices", "scope_warnings", "study_checks", "with_inputs", "abstention_metrics", "evaluate"]

SYNTHETIC_NOTE = "numbers on synthetic phantoms say nothing about clinical performance"


@dataclass(frozen=True)
class EvaluationResult:
    out: Path
    files: dict[str, Path]
    slice_metrics: dict | None
    patient_metrics: dict | None
    localisation_metrics: dict | None
    calibration_metrics: dict | None = None
    subtype_metrics: dict | None = None
    warnings: tuple[str, ...] = ()
    abstention_metrics: dict | None = None


@dataclass(frozen=True)
class StudyCheck:
    """What the node's scope and input checks say about one evaluated study."""

    reasons: tuple[Reason, ...]  # empty: triaged
    ran_model: bool  # False: the study has no CT series the node would analyse
    scope_checked: bool  # False: its DICOM files are missing or their headers unreadable
    missing_sources: tuple[Path, ...] = ()  # its DICOM files that were not found (scope not checked)

    @property
    def triaged(self) -> bool:
        return not self.reasons


def _scope_check(study: EvalStudy, scope: Scope, min_slices: int) -> StudyCheck:
    """The node's checks before the model: a CT series it would analyse, within `scope`.
    Without its DICOM files (a cache alone) a study is scored, its scope not checked: the
    files not found are kept for `scope_warnings`."""
    missing = tuple(s.source for s in study.slices if s.source is not None and not s.source.is_file())
    if missing:
        return StudyCheck((), True, False, missing)
    try:
        headers = [read_header(s.source) for s in study.slices if s.source is not None]
    except Exception:  # unreadable: the study is scored, its scope not checked
        headers = []
    if not headers or len(headers) != len(study.slices):
        return StudyCheck((), True, False)
    try:
        choice = choose_head_series(headers, min_slices)
    except NoAnalysableSeries as problem:
        return StudyCheck((Reason(ReasonCode.NO_SERIES, str(problem)),), False, True)
    reasons = scope_reasons(choice.slices, scope, lambda h: hu_from_dataset(pydicom.dcmread(h.path)))
    if scope.metal_check and not reasons:  # the node checks every slice for metal as its scan reads them
        metal = metal_reason([_metal_depth(header) for header in choice.slices])
        reasons += [metal] if metal is not None else []
    return StudyCheck(tuple(reasons), True, True)


def _metal_depth(header: SliceHeader) -> float | None:
    try:
        hu = hu_from_dataset(pydicom.dcmread(header.path))
    except Exception:  # a slice the scan would skip
        return None
    return metal_depth_mm(hu, header.pixel_spacing)


def study_checks(predictor: Predictor, eval_set: EvalSet, *, min_slices: int = 10) -> dict[str, StudyCheck]:
    """Each study's scope check, as the node would run it (the out-of-distribution score
    is added by `with_inputs`, once the model has run)."""
    return {study.study_id: _scope_check(study, predictor.config.scope, min_slices) for study in eval_set.studies}


def scope_warnings(eval_set: EvalSet, checks: dict[str, StudyCheck]) -> list[str]:
    """Why the scope checks of some studies were not run, with counts and where the files
    were looked for: never a silent skip."""
    unchecked = [s for s in eval_set.studies if not checks[s.study_id].scope_checked]
    if not unchecked:
        return []
    missing = [path for s in unchecked for path in checks[s.study_id].missing_sources]
    without = sum(bool(checks[s.study_id].missing_sources) for s in unchecked)
    warnings = []
    if missing:
        root = eval_set.source_root
        where = "" if root is None else f" under the data folder {root.describe()}" + (
            ": is it the folder prepare-rsna read?" if root.given else
            "; give --data-root the folder prepare-rsna read, where it is now, to check them")
        warnings.append(f"the node's scope checks were not run on {without} of {len(eval_set.studies)} studies: "
                        f"{len(missing)} of their DICOM files were not found (first: {missing[0]}){where}")
    if len(unchecked) > without:
        warnings.append(f"the node's scope checks were not run on {len(unchecked) - without} of "
                        f"{len(eval_set.studies)} studies whose DICOM headers could not be read")
    return warnings


def with_inputs(checks: dict[str, StudyCheck], predictor: Predictor, eval_set: EvalSet,
                outputs: SliceOutputs) -> dict[str, StudyCheck]:
    """The checks with each study's out-of-distribution score, when the checkpoint has a profile."""
    profile = predictor.config.inputs
    if profile is None:
        return checks
    done = dict(checks)
    for study in eval_set.studies:
        check = checks[study.study_id]
        if not check.ran_model or not study.slices:
            continue
        assessment = profile.assess([outputs[s.image_id][1] for s in study.slices])
        extra = (Reason(ReasonCode.OUT_OF_DISTRIBUTION, assessment.reason()),) if assessment.outside else ()
        done[study.study_id] = dataclasses.replace(check, reasons=check.reasons + extra)
    return done


def abstention_metrics(eval_set: EvalSet, checks: dict[str, StudyCheck], predictor: Predictor) -> dict:
    """How often the node would not triage, with 95 % intervals: overall, by reason, by
    kind of study (a shift, a real scan) and among the studies with ICH."""
    studies = eval_set.studies
    abstained = [s for s in studies if not checks[s.study_id].triaged]
    by_reason: dict[str, int] = {}
    for study in abstained:
        for code in {str(r.code) for r in checks[study.study_id].reasons}:
            by_reason[code] = by_reason.get(code, 0) + 1
    by_kind: dict[str, dict] = {}
    for kind in sorted({s.kind or "in distribution" for s in studies}):
        members = [s for s in studies if (s.kind or "in distribution") == kind]
        count = sum(not checks[s.study_id].triaged for s in members)
        by_kind[kind] = {"studies": len(members), "not_triaged": count,
                         "rate": wilson_interval(count, len(members)).as_dict()}
    with_ich = [s for s in studies if s.label == 1]
    profile = predictor.config.inputs
    return {
        "studies": len(studies), "not_triaged": len(abstained),
        "rate": wilson_interval(len(abstained), len(studies)).as_dict() if studies else None,
        "by_reason": dict(sorted(by_reason.items())), "by_kind": by_kind,
        "with_ich": len(with_ich), "with_ich_not_triaged": sum(not checks[s.study_id].triaged for s in with_ich),
        "scope_not_checked": sum(not checks[s.study_id].scope_checked for s in studies),
        "scope": predictor.config.scope.describe(),
        "input_profile": profile.describe() if profile is not None else None,
    }


def data_description(eval_set: EvalSet) -> str:
    """What every number measured on `eval_set` must say about its data."""
    return eval_set.description + (f" ({SYNTHETIC_NOTE})" if eval_set.synthetic else "")


SliceOutputs = dict[str, tuple[float, dict[str, np.ndarray]]]  # image_id → (P(ICH), descriptors by layer)


def infer_slices(predictor: Predictor, eval_set: EvalSet, slices: list[EvalSlice], *, progress: bool,
                 desc: str = "evaluate", layers: tuple[str, ...] | None = None) -> SliceOutputs:
    """P(ICH) and the descriptors (only `layers`, when given) of each distinct slice,
    loading the next batch while the model runs."""
    unique = list({s.image_id: s for s in slices}.values())
    batch = predictor.batch_size
    outputs: SliceOutputs = {}
    bar = tqdm(total=len(unique), desc=desc, unit="slice", disable=None if progress else True)

    def load(start: int) -> np.ndarray:
        return np.stack([eval_set.load(s, predictor) for s in unique[start:start + batch]])

    with ThreadPoolExecutor(max_workers=2) as pool:
        starts = list(range(0, len(unique), batch))
        pending = pool.submit(load, starts[0]) if starts else None
        for i, start in enumerate(starts):
            inputs = pending.result()
            pending = pool.submit(load, starts[i + 1]) if i + 1 < len(starts) else None
            inference = predictor.infer(inputs)
            for item, p, described in zip(unique[start:start + batch], inference.probabilities,
                                          inference.descriptors):
                kept = {k: v.astype(np.float32) for k, v in described.items() if layers is None or k in layers}
                outputs[item.image_id] = (float(p), kept)
            bar.update(len(inputs))
    bar.close()
    return outputs


def predict_slices(predictor: Predictor, eval_set: EvalSet, slices: list[EvalSlice], *,
                   progress: bool, desc: str = "evaluate") -> dict[str, float]:
    """P(ICH) for each distinct slice."""
    outputs = infer_slices(predictor, eval_set, slices, progress=progress, desc=desc, layers=())
    return {image_id: p for image_id, (p, _) in outputs.items()}


def _localised_key_slices(predictor: Predictor, eval_set: EvalSet, study: EvalStudy,
                          probabilities: dict[str, float], *, slice_threshold: float, key_slices: int,
                          margin: float) -> list[bool]:
    """For each true-positive key slice of `study` (one the node would show, truly bleeding
    and above the slice threshold): is its Grad-CAM peak inside the dilated bleed mask?"""
    from training.synthetic import read_mask

    p = np.array([probabilities[s.image_id] for s in study.slices])
    chosen = [i for i in key_slice_indices(p, key_slices) if study.slices[i].label == 1 and p[i] > slice_threshold]
    if not chosen:
        return []
    cams = predictor.gradcam(np.stack([eval_set.load(study.slices[i], predictor) for i in chosen]))
    masks = read_mask(study.mask_folder)
    size = predictor.config.preprocess.input_size
    return [peak_inside(cam, dilate(mask_to_input(masks[i], size), margin))
            for i, cam in zip(chosen, cams)]


def localisation_metrics(predictor: Predictor, eval_set: EvalSet, probabilities: dict[str, float], *,
                         slice_threshold: float, key_slices: int = 3, progress: bool = False) -> dict | None:
    """Share of true-positive key slices whose Grad-CAM peak lies in the bleed mask dilated
    by half a Grad-CAM cell; None when the data has no lesion masks (only synthetic studies
    have them)."""
    studies = [s for s in eval_set.studies if s.mask_folder is not None and s.label == 1]
    if not studies:
        return None
    cell = predictor.gradcam_cell_pixels()
    hits: list[bool] = []
    for study in tqdm(studies, desc="grad-cam", unit="study", disable=None if progress else True):
        hits += _localised_key_slices(predictor, eval_set, study, probabilities, slice_threshold=slice_threshold,
                                      key_slices=key_slices, margin=cell / 2)
    return {"key_slices_per_study": key_slices, "slice_threshold": slice_threshold,
            "gradcam_layer": predictor.gradcam_layer, "gradcam_cell_pixels": round(cell, 2),
            "margin_pixels": round(cell / 2, 2), "input_size": predictor.config.preprocess.input_size,
            "positive_studies": len(studies), "true_positive_key_slices": len(hits),
            "peak_inside": int(sum(hits)), "fraction": wilson_interval(int(sum(hits)), len(hits)).as_dict()}


def _slice_table(eval_set: EvalSet, probabilities: dict[str, float], out: Path, resamples: int,
                 curves: dict[str, Path], interval: str) -> tuple[dict | None, dict | None, dict | None]:
    """Table 1 on the slice-level list, its calibration and its sensitivity by subtype
    (where the data has subtypes), and the ROC, PR and reliability plots when both classes
    are there."""
    if not eval_set.slice_level:
        return None, None, None
    labels = np.array([s.label for s in eval_set.slice_level])
    scores = np.array([probabilities[s.image_id] for s in eval_set.slice_level])
    groups = np.array([s.group for s in eval_set.slice_level])
    metrics = slice_level_metrics(labels, scores, groups=groups, resamples=resamples, interval=interval)
    calibration = calibration_metrics(labels, scores, groups=groups, resamples=resamples)
    subtypes = None
    if all(s.subtypes is not None for s in eval_set.slice_level):
        subtypes = subtype_sensitivity([s.subtypes for s in eval_set.slice_level], labels, scores, interval=interval)
    if len(set(labels.tolist())) == 2:
        curves["slice_roc"], curves["slice_pr"] = out / "slice_roc.png", out / "slice_pr.png"
        plot_roc(labels, scores, curves["slice_roc"], f"Slice level: {eval_set.description}")
        plot_pr(labels, scores, curves["slice_pr"], f"Slice level: {eval_set.description}")
        curves["reliability"] = out / "reliability.png"
        plot_reliability(calibration, curves["reliability"], f"Calibration, slice level: {eval_set.description}")
    return metrics, calibration, subtypes


def _patient_table(eval_set: EvalSet, probabilities: dict[str, float], out: Path, resamples: int,
                   rule: TriageRule, rule_source: str, curves: dict[str, Path], interval: str,
                   checks: dict[str, StudyCheck] | None = None) -> dict | None:
    """Table 2 under `rule` on the labelled studies the model ran on (with `checks`, only
    those the node would triage), and the study-score ROC plot when both classes are there."""
    studies = [s for s in eval_set.studies if s.slices and s.label is not None
               and all(x.image_id in probabilities for x in s.slices)
               and (checks is None or checks[s.study_id].triaged)]
    if not studies:
        return None
    labels = np.array([s.label for s in studies])
    per_study = [np.array([probabilities[x.image_id] for x in s.slices]) for s in studies]
    metrics = patient_level_metrics(labels, per_study, rule=rule, resamples=resamples, interval=interval)
    metrics["rule_source"] = rule_source
    if len(set(labels.tolist())) == 2:
        name = "patient_roc" if checks is None else "patient_roc_triaged"
        curves[name] = out / f"{name}.png"
        plot_roc(labels, np.array([p.max() for p in per_study]), curves[name],
                 f"Patient level (max P(ICH)){'' if checks is None else ', studies triaged'}: {eval_set.description}")
    return metrics


# The paper's lists are balanced; further from half than this, rates that depend on
# prevalence (PPV, NPV, accuracy) no longer compare with its tables.
BALANCE_TOLERANCE = 0.1


def data_warnings(eval_set: EvalSet) -> list[str]:
    """What a reader of the numbers must know about the evaluation data: empty levels, one
    class only, and lists that are not balanced as the paper's are."""
    warnings = []
    studies = [s for s in eval_set.studies if s.slices]
    # CQ500 has no slice labels: no slice level is expected there.
    slice_labelled = bool(eval_set.slice_level) or any(x.label is not None for s in studies for x in s.slices)
    levels = {"slice-level list": [s.label for s in eval_set.slice_level],
              "patient level": [s.label for s in studies if s.label is not None]}
    for level, labels in levels.items():
        if not labels:
            if level == "patient level" or slice_labelled:
                warnings.append(f"the {level} is empty: no {level.split()[0]}-level figure is reported")
            continue
        positives = sum(labels)
        if positives in (0, len(labels)):
            warnings.append(f"the {level} holds one class only ({len(labels)}, all {'with' if positives else 'without'} "
                            "ICH): sensitivity or specificity and every area are undefined")
        elif abs(positives / len(labels) - 0.5) > BALANCE_TOLERANCE:
            warnings.append(f"the {level} is unbalanced ({positives} of {len(labels)} with ICH, "
                            f"{positives / len(labels):.0%}), unlike the paper's balanced lists: PPV, NPV and "
                            "accuracy depend on prevalence and do not compare with the paper's tables")
    return warnings


def _write_predictions(path: Path, slices: list[EvalSlice], probabilities: dict[str, float]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "group", "label", "probability"])
        for item in {s.image_id: s for s in slices}.values():
            # repr: the shortest text that reads back as the same float, so any metric
            # recomputed from this file is the one reported (rounding can reorder ties).
            writer.writerow([item.image_id, item.group, "" if item.label is None else item.label,
                             repr(probabilities[item.image_id])])


def evaluate(checkpoint: Path, data: Path, out: Path, *, device: Device = Device("auto"), batch_size: int = 8,
             resamples: int = 2000, progress: bool = True, backend: Backend = Backend.AUTO,
             key_slices: int = 3, gradcam_layer: GradcamLayer = GradcamLayer.AUTO,
             rule: TriageRule | None = None, rule_source: str = "", interval: str = "wilson",
             data_root: Path | None = None) -> EvaluationResult:
    """Predict every slice of `data` with `checkpoint`, then write metrics, tables and plots.

    When `data` is a prepared folder, its DICOM files (for the scope checks) are looked for
    under `data_root`, or else the data folder it was prepared from.

    The patient rule reported is `rule` (described by `rule_source`), or else the one the
    checkpoint recommends; the report says which. `interval` is how proportions get their
    intervals: "wilson", or "clopper-pearson" to compare with the paper's published ones.
    """
    predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size, backend=backend,
                                          gradcam_layer=gradcam_layer)
    if rule is None:
        rule, rule_source = predictor.config.triage, f"the rule recommended by the checkpoint {checkpoint}"
    eval_set = load_eval_set(Path(data), predictor.config.preprocess, data_root=data_root)
    checks = study_checks(predictor, eval_set)
    wanted = eval_set.slice_level + [s for study in eval_set.studies if checks[study.study_id].ran_model
                                     for s in study.slices]
    profile = predictor.config.inputs
    outputs = infer_slices(predictor, eval_set, wanted, progress=progress, layers=(profile.layer,) if profile else ())
    probabilities = {image_id: p for image_id, (p, _) in outputs.items()}
    checks = with_inputs(checks, predictor, eval_set, outputs)
    out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, Path] = {}
    slice_metrics, calibration, subtypes = _slice_table(eval_set, probabilities, out, resamples, curves, interval)
    patient_metrics = _patient_table(eval_set, probabilities, out, resamples, rule, rule_source, curves, interval)
    abstention = abstention_metrics(eval_set, checks, predictor)
    abstention["patient_level_triaged"] = _patient_table(eval_set, probabilities, out, resamples, rule, rule_source,
                                                         curves, interval, checks)
    warnings = data_warnings(eval_set) + scope_warnings(eval_set, checks)
    localisation = localisation_metrics(predictor, eval_set, probabilities, slice_threshold=rule.slice_threshold,
                                        key_slices=key_slices, progress=progress)
    model = predictor.config
    model_description = (f"{model.architecture} from {checkpoint} (trained on: {model.provenance.training_data}; "
                         f"{model.provenance.description})")
    files = write_report(out, slice_metrics=slice_metrics, patient_metrics=patient_metrics,
                         localisation_metrics=localisation, calibration_metrics=calibration, subtype_metrics=subtypes,
                         abstention_metrics=abstention,
                         warnings=warnings, interval=interval, data_description=data_description(eval_set),
                         model_description=model_description, curves=curves)
    files["predictions"] = out / "predictions.csv"
    _write_predictions(files["predictions"], wanted, probabilities)
    return EvaluationResult(out, files, slice_metrics, patient_metrics, localisation, calibration, subtypes,
                            tuple(warnings), abstention)
