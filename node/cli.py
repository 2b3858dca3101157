"""`ichnode`: the one command-line entry point of the product.

Each command imports what it needs when it runs (and its arguments are added only when
it is chosen), so `ichnode --help`, `--version` and `status` load no model library.

This is the one place that turns an error into a message and an exit code: errors the
project raises on purpose print one line naming what was wrong and exit 1; anything else
prints one line asking for a report and exits 70. No traceback reaches a user. A reader
that goes away (`ichnode status | head -1`) ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

from node.config import ENV_VAR, RuleSource, load_config
from node.errors import CannotReanalyse, ConfigError, IchNodeError, TrainingStopped
from training.inference.settings import Backend, Device
from training.model.layers import GradcamLayer

__all__ = ["main", "build_parser"]

EXIT_ERROR = 1
EXIT_INTERNAL = 70
EXIT_STOPPED = 128 + 15  # as a process ended by SIGTERM: a scheduler sees the job was pre-empted

Handler = Callable[[argparse.Namespace], int]


def _synth(args: argparse.Namespace) -> int:
    from training.synthetic import Shift, SyntheticOptions, write_studies

    options = SyntheticOptions(
        studies=args.studies,
        seed=args.seed,
        positive_fraction=args.positive_fraction,
        localizer=args.localizer,
        bone_series=args.bone_series,
        shift=Shift(args.shift) if args.shift else None,
    )
    labels = write_studies(args.out, options)
    positives = sum(study.positive for study in labels)
    kind = f"synthetic studies shifted out of distribution ({args.shift})" if args.shift \
        else "synthetic head-CT studies"
    print(
        f"wrote {len(labels)} {kind} to {args.out} "
        f"({positives} with bleeds, {len(labels) - positives} without; seed {args.seed}); "
        "SYNTHETIC DATA - NOT PATIENT DATA"
    )
    return 0


def _add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the studies into")
    parser.add_argument("--studies", type=int, required=True, help="number of studies")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.5,
        help="share of studies with a bleed, rounded to a whole count (default 0.5)",
    )
    parser.add_argument(
        "--localizer", action="store_true", help="add a lateral scout (LOCALIZER) series"
    )
    parser.add_argument(
        "--bone-series", action="store_true", help="add the same slices in a bone kernel"
    )
    parser.add_argument(
        "--shift", choices=["contrast", "noise", "metal", "body"], default=None,
        help="write the studies as inputs the model was not trained on, for testing abstention: after IV "
             "contrast, heavy noise, metal streaks, or an abdomen (headers do not give the shift away)",
    )


def _ood_set(args: argparse.Namespace) -> int:
    from training.oodset import write_ood_set

    counts = write_ood_set(args.out, seed=args.seed, studies_per_shift=args.studies_per_shift)
    print(f"wrote {sum(counts.values())} studies a head-CT model was not trained on to {args.out}:")
    for kind, count in counts.items():
        print(f"  {count} {kind}")
    print("evaluate abstention with `ichnode evaluate --data` on it; NOT PATIENT DATA for the synthetic studies, "
          "public test files for the real ones")
    return 0


def _add_ood_set_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="a new folder to write the studies into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic shifted studies (default 0)")
    parser.add_argument("--studies-per-shift", type=_positive_int, default=5,
                        help="synthetic studies of each shift: contrast, noise, metal, body (default 5)")


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${ENV_VAR}, else ./config.toml)",
    )


def _serve(args: argparse.Namespace) -> int:
    from node.logs import setup_logging
    from node.service import serve

    config = load_config(args.config)
    setup_logging()
    serve(config)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from node.logs import setup_logging
    from node.service import run_worker

    config = load_config(args.config)
    setup_logging()
    run_worker(config)
    return 0


def _log(args: argparse.Namespace) -> int:
    from node.triagelog import LogReader, print_events

    config = load_config(args.config)
    path = config.log.path
    color = sys.stdout.isatty() and not args.json
    reader = LogReader(path)
    try:
        if args.follow:
            events = reader.follow(on_wait=lambda: print(
                f"waiting for the triage log at {path} to appear", file=sys.stderr, flush=True))
        elif not path.exists():
            print(f"no triage log yet at {path}", file=sys.stderr)
            return 0
        else:
            events = reader.read()
            events = events[-args.lines :] if args.lines else events
        print_events(events, sys.stdout, as_json=args.json, color=color)
    finally:
        if reader.skipped:
            count = reader.skipped
            print(f"{count} unreadable line{'' if count == 1 else 's'} skipped in {path}", file=sys.stderr)
    return 0


def _add_log_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_argument(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    parser.add_argument("--json", action="store_true", help="print the raw JSON lines")
    parser.add_argument("--lines", "-n", type=int, default=0, help="only the last N events")


def _status(args: argparse.Namespace) -> int:
    from node.status import print_status

    print_status(load_config(args.config), sys.stdout, limit=args.latest, as_json_text=args.json,
                 version=_version())
    return 0


def _add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_argument(parser)
    parser.add_argument("--latest", type=_study_count, default=10, help="how many recent studies to list (1-1000)")
    parser.add_argument("--json", action="store_true",
                        help="print the queue as JSON (what the web page's /api/queue gives)")


def _study_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"must be a whole number 1-1000, got {text!r}")
    return int(text)


def _retry(args: argparse.Namespace) -> int:
    from node.status import retry_deliveries

    deliveries, notifications = retry_deliveries(load_config(args.config))
    print(f"re-queued {deliveries} failed deliveries and {notifications} failed notifications; "
          "a running node sends them within seconds")
    return 0


def _reanalyse(args: argparse.Namespace) -> int:
    from node.dashboard import reanalysis_line
    from node.status import reanalyse, reanalyse_failed
    from storage.state import Reanalysis

    config = load_config(args.config)
    outcomes = reanalyse_failed(config) if args.failed else reanalyse(config, args.studies)
    if not outcomes:
        print("no failed studies")
        return 0
    refused = [o for o in outcomes if o.outcome in (Reanalysis.UNKNOWN, Reanalysis.NOTHING_LEFT)]
    for outcome in outcomes:
        if outcome not in refused:
            print(reanalysis_line(outcome))
    if any(o.outcome == Reanalysis.QUEUED for o in outcomes):
        print("a running node analyses them in turn; `ichnode log --follow` shows the results")
    if refused:
        raise CannotReanalyse("; ".join(reanalysis_line(o) for o in refused))
    return 0


def _add_reanalyse_arguments(parser: argparse.ArgumentParser) -> None:
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("studies", nargs="*", default=[], metavar="STUDY_UID",
                        help="StudyInstanceUID of a failed or done study (several may be named)")
    chosen.add_argument("--failed", action="store_true", help="every failed study")
    _add_config_argument(parser)


def _db(args: argparse.Namespace) -> int:
    from node.logs import setup_logging
    from node.service import upgrade_database

    config = load_config(args.config)
    setup_logging()
    database = upgrade_database(config)
    if database.created:
        print(f"created the tables of {database.shown} at schema revision {database.revision}")
    elif database.upgraded_from:
        print(f"upgraded {database.shown} from {database.upgraded_from} to schema revision {database.revision}")
    else:
        print(f"{database.shown} is at schema revision {database.revision}, this release's: nothing to do")
    return 0


def _add_db_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["upgrade"],
                        help="upgrade: bring the database to this release's schema (stop every node using it first)")
    _add_config_argument(parser)


def _prepare(args: argparse.Namespace) -> int:
    from training.prepare import prepare

    summary = prepare(args.data, args.out, workers=args.workers, training_data=args.training_data)
    provenance = summary["provenance"]
    print(
        f"prepared {summary['usable_slices']} slices ({summary['positive_slices']} with ICH) of "
        f"{summary['layout']}-layout data into {args.out}; training data: {summary['training_data']} "
        f"(stated by {provenance['stated_by']}); {len(summary['skipped'])} skipped (see prepare.json); "
        f"patients train/val/test {summary['patients']['train']}/{summary['patients']['val']}/"
        f"{summary['patients']['test']}; cache: {summary['cache_made']} images made, {summary['cache_reused']} "
        f"reused, {summary['cache_removed']} stale removed"
    )
    if provenance["stated_by"] == "user" and provenance["derived_from_data"] != summary["training_data"]:
        print(f"note: the files alone would make this data {provenance['derived_from_data']!r}; "
              f"recorded as {summary['training_data']!r} because you said so")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    return 0


def _add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    from training.prepare import DATA_KINDS

    parser.add_argument("--data", type=Path, required=True,
                        help="RSNA folder (stage_2_train.csv, stage_2_train/) or `ichnode synth` output")
    parser.add_argument("--out", type=Path, required=True, help="folder for the split lists and the cache")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: all cores)")
    parser.add_argument("--training-data", choices=DATA_KINDS, default=None,
                        help="what the data is, as checkpoints trained on it will say (default: read from the "
                             "files: synthetic phantoms are 'synthetic', RSNA 2019's files 'rsna', others 'other')")


def _train(args: argparse.Namespace) -> int:
    from training.train import load_train_config, train

    config = load_train_config(args.config)
    try:
        result = train(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingStopped as stopped:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ichnode train: {stopped}", file=sys.stderr)
        return EXIT_STOPPED
    if int(os.environ.get("RANK", "0")) == 0:
        auc = "n/a" if result.best_val_roc_auc is None else f"{result.best_val_roc_auc:.4f}"
        print(f"checkpoint {result.checkpoint} (epoch {result.best_epoch}, validation ROC-AUC {auc}); "
              f"curves and metrics in {result.checkpoint.parent}")
    return 0


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="training TOML (default: the recipe of the paper's authors' code on var/prepared)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in experiments/NAME from its latest state (state/step-*.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier run left in experiments/NAME (without it, that is refused)")


def _evaluate(args: argparse.Namespace) -> int:
    if args.history:
        return _evaluate_history(args)
    if args.checkpoint is None or args.data is None:
        raise ConfigError("ichnode evaluate needs --checkpoint and --data (or --history and --labels to score "
                          "the node's own analyses)")
    from training.evaluate import evaluate

    rule, source = None, ""
    if args.triage_config:
        triage = load_config(args.triage_config).triage
        if triage.source == RuleSource.CONFIG:
            rule, source = triage.configured_rule, f"[triage] of {args.triage_config}"
    out = args.out or Path("experiments") / f"eval-{args.checkpoint.stem}-{args.data.resolve().name}"
    result = evaluate(args.checkpoint, args.data, out, device=args.device, batch_size=args.batch_size,
                      resamples=args.resamples, backend=args.backend, gradcam_layer=args.gradcam_layer,
                      rule=rule, rule_source=source, interval=args.interval, data_root=args.data_root)
    print((result.files["report"]).read_text())
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"written to {out}: " + ", ".join(sorted(p.name for p in result.files.values())))
    return 0


def _evaluate_history(args: argparse.Namespace) -> int:
    from node.validation import site_evaluation
    from training.calibrate import SMALL_CLASS

    if args.labels is None:
        raise ConfigError("ichnode evaluate --history needs --labels CSV (study_instance_uid or accession_number, "
                          "and ich yes/no)")
    config = load_config(args.config)
    out = args.out or Path("experiments") / f"site-{args.labels.stem}"
    joined, paths = site_evaluation(config.log.path, args.labels, out, resamples=args.resamples)
    print(paths["report"].read_text())
    print(f"{len(joined.matched)} studies matched; {len(joined.unlabelled)} analysed studies have no label; "
          f"{len(joined.not_analysed)} labels match no analysis; {joined.without_probabilities} analyses were "
          "logged before slice probabilities were recorded")
    if joined.not_triaged:
        print(f"{len(joined.not_triaged)} labelled studies were NOT TRIAGED (no verdict, not in the tables); "
              f"{sum(label for _, label in joined.not_triaged)} of them with ICH")
    positives = sum(m.label for m in joined.matched)
    if min(positives, len(joined.matched) - positives) < SMALL_CLASS:
        print(f"warning: only {positives} studies with ICH and {len(joined.matched) - positives} without were "
              f"matched; with fewer than {SMALL_CLASS} of either, the sensitivity or specificity interval is too "
              "wide to decide on (docs/validation.md)")
    for uid, accession in joined.unlabelled[:10]:
        print(f"  no label: study {uid} (accession {accession or '-'})")
    for key in joined.not_analysed[:10]:
        print(f"  not analysed: {key}")
    print(f"written to {out}: " + ", ".join(sorted(p.name for p in paths.values())))
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export

    result = export(args.checkpoint, args.out, samples=args.samples)
    print(f"wrote {result.onnx} (checked against PyTorch on {result.samples} synthetic phantom slices: P(ICH) "
          f"differs by at most {result.max_difference:.1e}) and the model card {result.card}")
    return 0


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for model.onnx and MODEL_CARD.md")
    parser.add_argument("--samples", type=_positive_int, default=4,
                        help="synthetic phantom slices the ONNX model is checked on against PyTorch (default 4)")


def _calibrate(args: argparse.Namespace) -> int:
    from training.calibrate import calibrate, write_calibrated
    from training.report import format_interval

    rule_family = dict(target=args.target_sensitivity, positive_fraction=args.positive_fraction,
                       min_positive_slices=args.min_positive_slices, resamples=args.resamples)
    if args.history:
        from node.validation import site_operating_point

        if args.labels is None or args.data is not None:
            raise ConfigError("ichnode calibrate --history takes --labels CSV (and --config), not --data")
        joined, point = site_operating_point(load_config(args.config).log.path, args.labels, args.checkpoint,
                                             **rule_family)
        print(f"{len(joined.matched)} of the site's analyses by this checkpoint matched a label "
              f"({len(joined.unlabelled)} without a label, {len(joined.not_analysed)} labels without one)")
        write_calibrated(args.checkpoint, args.out, point)
    elif args.data is None:
        raise ConfigError("ichnode calibrate needs --data (or --history and --labels: the site's own analyses)")
    else:
        point = calibrate(args.checkpoint, args.data, args.out, device=args.device, batch_size=args.batch_size,
                          backend=args.backend, **rule_family)
    rule = point.rule
    print(f"operating point for study sensitivity ≥ {point.target_sensitivity:g}, measured on {point.data}:")
    print(f"  rule: positive when at least max({rule.min_positive_slices}, ceil({rule.positive_fraction:g} × "
          f"slices)) slices have P(ICH) > {rule.slice_threshold:.4f}")
    for name in ("sensitivity", "specificity"):
        wilson, boot = getattr(point, name), getattr(point, f"{name}_bootstrap")
        print(f"  {name}: {format_interval(wilson.as_dict())} Wilson; {format_interval(boot.as_dict())} "
              f"{boot.method}")
    print(f"  threshold chosen again on each resample: {format_interval(point.threshold_bootstrap.as_dict())}")
    print(f"  {point.studies} studies: {point.positives} with ICH, {point.negatives} without")
    for warning in point.warnings:
        print(f"warning: {warning}")
    print(f"written to {args.out}: the same weights, recommending this rule (use it with [triage] source = "
          "\"checkpoint\")")
    return 0


def _fit_ood(args: argparse.Namespace) -> int:
    from training.abstention import fit_ood, method_table
    from training.configfile import read_toml, section_from_table
    from training.model.scope import Scope

    scope = None
    if args.scope_config is not None:
        table = read_toml(args.scope_config).get("scope")
        if table is None:
            raise ConfigError(f"{args.scope_config} has no [scope] table")
        scope = section_from_table(Scope, "scope", table)
    result = fit_ood(args.checkpoint, args.data, args.validation, args.out, layer=args.layer,
                     target=args.target_abstention, shifted=args.shifted, scope=scope, report=args.report,
                     device=args.device, batch_size=args.batch_size, backend=args.backend)
    profile = result.profile
    print(f"input profile: {profile.describe()}")
    print(f"  fitted on {profile.fitted_on}")
    print("methods compared (each limit conformal on the same validation studies):")
    for line in method_table(result.methods):
        print(f"  {line}")
    print(f"written to {args.out}: the same weights, with this profile"
          + (f" and the scope of {args.scope_config}" if scope else "")
          + " (a study above either limit is NOT TRIAGED when triage.abstain = true)")
    return 0


def _add_fit_ood_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True,
                        help="the data the checkpoint was trained on: its prepare-rsna folder (the training "
                             "list) or `ichnode synth` studies")
    parser.add_argument("--validation", type=Path, required=True,
                        help="studies never trained on, to fix the limit on: `ichnode synth` studies, a CQ500 "
                             "folder or a prepare-rsna folder (its validation patients)")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    parser.add_argument("--layer", default="avgpool", help="the descriptor layer of the profile (default avgpool)")
    parser.add_argument("--target-abstention", type=_probability, default=0.01,
                        help="the highest share of in-distribution studies that may be not triaged (default 0.01)")
    parser.add_argument("--shifted", type=Path, action="append", default=[], metavar="DIR",
                        help="studies unlike the training data (`ichnode synth --shift`), to compare the methods "
                             "on; repeatable; keep them apart from what you evaluate on")
    parser.add_argument("--scope-config", type=Path, default=None, metavar="TOML",
                        help="a file whose [scope] table declares what the checkpoint supports (the training "
                             "config); default: the checkpoint's own")
    parser.add_argument("--report", type=Path, default=None, metavar="DIR",
                        help="write fit-ood.md and fit-ood.json here")
    parser.add_argument("--device", type=_device, default=Device("auto"), help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--backend", type=Backend, default=Backend.AUTO, choices=list(Backend))


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=None,
                        help="labelled studies not used for training: a prepare-rsna folder (its validation "
                             "split), `ichnode synth` studies, or a CQ500 folder")
    parser.add_argument("--history", action="store_true",
                        help="calibrate on the site's own analyses by this checkpoint (the triage log named "
                             "by --config) against --labels, instead of --data")
    parser.add_argument("--labels", type=Path, default=None, metavar="CSV",
                        help="with --history: the site's reference labels (docs/validation.md)")
    _add_config_argument(parser)
    parser.add_argument("--out", type=Path, required=True, help="the calibrated checkpoint to write")
    parser.add_argument("--target-sensitivity", type=_probability, default=0.95)
    parser.add_argument("--positive-fraction", type=_probability, default=0.0,
                        help="the rule's fraction of slices (default 0: a threshold on the study score)")
    parser.add_argument("--min-positive-slices", type=_positive_int, default=1)
    parser.add_argument("--device", type=_device, default=Device("auto"), help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--backend", type=Backend, default=Backend.AUTO, choices=list(Backend))
    parser.add_argument("--resamples", type=_positive_int, default=2000, help="bootstrap resamples")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _device(text: str) -> Device:
    try:
        return Device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from training.metrics import INTERVAL_METHODS

    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None,
                        help="a prepare-rsna folder (test split), `ichnode synth` studies, or a CQ500 folder")
    parser.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                        help="with a prepare-rsna folder: where the data it was prepared from (its --data) is now, "
                             "for the scope checks (default: the folder recorded in its prepare.json)")
    parser.add_argument("--history", action="store_true",
                        help="score the node's own analyses (its triage log, from --config) against --labels "
                             "instead of a checkpoint on a data set (docs/validation.md)")
    parser.add_argument("--labels", type=Path, default=None, metavar="CSV",
                        help="with --history: the site's reference labels (study_instance_uid or "
                             "accession_number, and ich yes/no)")
    _add_config_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default experiments/eval-…)")
    parser.add_argument("--device", type=_device, default=Device("auto"), help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=_positive_int, default=8)
    parser.add_argument("--gradcam-layer", type=GradcamLayer, default=GradcamLayer.AUTO, choices=list(GradcamLayer),
                        help="layer Grad-CAM explains at, as explain.gradcam_layer (synthetic data only)")
    parser.add_argument("--backend", type=Backend, default=Backend.AUTO, choices=list(Backend),
                        help="auto (ONNX Runtime on a CPU, PyTorch on a GPU) | torch | onnxruntime")
    parser.add_argument("--triage-config", type=Path, default=None, metavar="PATH",
                        help="report the patient rule this node config puts in force: its [triage] keys "
                             "with source = \"config\" (default, and with source = \"checkpoint\": the rule "
                             "the checkpoint recommends)")
    parser.add_argument("--resamples", type=_positive_int, default=2000, help="bootstrap resamples for AUC intervals")
    parser.add_argument("--interval", choices=INTERVAL_METHODS, default="wilson",
                        help="intervals of proportions: wilson (default) or clopper-pearson (exact; the paper's "
                             "published Table 2 intervals are Clopper-Pearson, so use it to compare with the paper)")


# name → (one-line help, argument builder, handler)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {
    "serve": ("receive studies over DICOM, analyse them and send results back",
              _add_config_argument, _serve),
    "worker": ("analyse ready studies (extra worker processes or hosts)", _add_config_argument, _worker),
    "log": ("print the triage log (--follow to keep watching)", _add_log_arguments, _log),
    "status": ("show the queue by state and the latest studies", _add_status_arguments, _status),
    "retry": ("re-queue failed deliveries and notifications", _add_config_argument, _retry),
    "reanalyse": ("put failed or done studies back in the queue to be analysed again (new result series "
                  "follow the earlier ones)", _add_reanalyse_arguments, _reanalyse),
    "db": ("manage the database's schema: `ichnode db upgrade`", _add_db_arguments, _db),
    "synth": ("write synthetic head-CT studies with labels", _add_synth_arguments, _synth),
    "prepare-rsna": ("split and cache an RSNA-layout (or synthetic) data set for training",
                     _add_prepare_arguments, _prepare),
    "train": ("train a model and write a checkpoint", _add_train_arguments, _train),
    "calibrate": ("choose a checkpoint's operating point for a target study sensitivity and write it into "
                  "a new checkpoint", _add_calibrate_arguments, _calibrate),
    "evaluate": ("evaluate a checkpoint (slice and patient level, with 95 percent intervals)",
                 _add_evaluate_arguments, _evaluate),
    "ood-set": ("write studies a head-CT model was not trained on (synthetic shifts, real CT of other kinds, "
                "MR), to measure abstention", _add_ood_set_arguments, _ood_set),
    "fit-ood": ("describe a checkpoint's training inputs, so studies unlike them are not triaged, and write "
                "it into a new checkpoint", _add_fit_ood_arguments, _fit_ood),
    "export": ("write a checkpoint as an ONNX model (checked against PyTorch) and its model card",
               _add_export_arguments, _export),
}


def _version() -> str:
    """The installed release, as pyproject.toml's [project] version names it."""
    try:
        return metadata.version("ichnode")
    except metadata.PackageNotFoundError:  # a checkout run with `python -m node.cli`, never pip-installed
        return "(not installed)"


class _CommandParser(argparse.ArgumentParser):
    """One command's parser, whose arguments are added only once that command is chosen:
    some take their choices from modules that load heavy libraries."""

    def __init__(self, *, add_arguments: Callable[[argparse.ArgumentParser], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_arguments: Callable[[argparse.ArgumentParser], None] | None = add_arguments

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if self._add_arguments is not None:
            self._add_arguments(self)
            self._add_arguments = None
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichnode",
        description="DICOM node that triages head CT for intracranial hemorrhage (EffClass).",
    )
    parser.add_argument("--version", action="version", version=f"ichnode {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_CommandParser)
    for name, (summary, add_arguments, handler) in _COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary, add_arguments=add_arguments)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
        return code
    except BrokenPipeError:
        # The reader went away (`| head`); as Python's documentation advises, point stdout
        # at devnull so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except IchNodeError as exc:
        print(f"ichnode {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # disk full, permission denied, missing folder: say which file
        print(f"ichnode {args.command}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the last line of defence: no traceback reaches a user
        print(
            f"ichnode {args.command}: internal error ({type(exc).__name__}: {exc}); "
            "please report it with the command you ran",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
