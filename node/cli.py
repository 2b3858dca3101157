"""`ichnode`: the one command-line entry point of the product.

Every command of the contract in DESIGN.md is listed; a command whose feature is not
built yet says so and exits with status 2 instead of pretending to work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from node.config import ENV_VAR, load_config
from node.errors import IchNodeError

__all__ = ["main", "build_parser"]

EXIT_ERROR = 1
EXIT_NOT_AVAILABLE = 2
EXIT_INTERNAL = 70

Handler = Callable[[argparse.Namespace], int]


def _synth(args: argparse.Namespace) -> int:
    from training.synthetic import SyntheticOptions, write_studies

    options = SyntheticOptions(
        studies=args.studies,
        seed=args.seed,
        positive_fraction=args.positive_fraction,
        localizer=args.localizer,
        bone_series=args.bone_series,
    )
    labels = write_studies(args.out, options)
    positives = sum(study.positive for study in labels)
    print(
        f"wrote {len(labels)} synthetic head-CT studies to {args.out} "
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


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default: ${ENV_VAR}, else ./config.toml)",
    )


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from node.service import serve

    config = load_config(args.config)
    _setup_logging()
    serve(config)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from node.service import run_worker

    config = load_config(args.config)
    _setup_logging()
    run_worker(config)
    return 0


def _log(args: argparse.Namespace) -> int:
    from node.triagelog import follow_events, print_events, read_events

    config = load_config(args.config)
    color = sys.stdout.isatty() and not args.json
    if args.follow:
        print_events(follow_events(config.log.path), sys.stdout, as_json=args.json, color=color)
        return 0
    if not config.log.path.exists():
        print(f"no triage log yet at {config.log.path}", file=sys.stderr)
        return 0
    events = read_events(config.log.path)
    print_events(events[-args.lines :] if args.lines else events, sys.stdout, as_json=args.json, color=color)
    return 0


def _add_log_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_argument(parser)
    parser.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    parser.add_argument("--json", action="store_true", help="print the raw JSON lines")
    parser.add_argument("--lines", "-n", type=int, default=0, help="only the last N events")


def _status(args: argparse.Namespace) -> int:
    from node.status import print_status

    print_status(load_config(args.config), sys.stdout, limit=args.latest)
    return 0


def _add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _add_config_argument(parser)
    parser.add_argument("--latest", type=int, default=10, help="how many recent studies to list")


def _retry(args: argparse.Namespace) -> int:
    from node.status import retry_deliveries

    count = retry_deliveries(load_config(args.config))
    print(f"re-queued {count} failed deliveries; a running node sends them within seconds")
    return 0


def _not_available(command: str) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        print(
            f"ichnode {command}: not available yet in this version of ichnode",
            file=sys.stderr,
        )
        return EXIT_NOT_AVAILABLE

    return handler


# name → (one-line help, argument builder or None, handler or None when not built yet)
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None, Handler | None]] = {
    "serve": ("receive studies over DICOM, analyse them and send results back",
              _add_config_argument, _serve),
    "worker": ("analyse ready studies (extra worker processes or hosts)", _add_config_argument, _worker),
    "log": ("print the triage log (--follow to keep watching)", _add_log_arguments, _log),
    "status": ("show the queue by state and the latest studies", _add_status_arguments, _status),
    "retry": ("re-queue failed deliveries", _add_config_argument, _retry),
    "synth": ("write synthetic head-CT studies with labels", _add_synth_arguments, _synth),
    "train": ("train a model and write a checkpoint", None, None),
    "evaluate": ("evaluate a checkpoint (slice and patient level)", None, None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichnode",
        description="DICOM node that triages head CT for intracranial hemorrhage (EffClass).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, add_arguments, handler) in _COMMANDS.items():
        built = handler is not None
        sub = commands.add_parser(
            name,
            help=summary if built else f"{summary} (not available yet)",
            description=summary if built else f"{summary}. Not available yet.",
        )
        if add_arguments is not None:
            add_arguments(sub)
        sub.set_defaults(handler=handler or _not_available(name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
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
