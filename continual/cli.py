"""Command line: ``continual run CONFIG [key=value ...]``, ``continual lm CONFIG [key=value ...]``,
``continual uptrain [CONFIG] [key=value ...]``, ``continual compare CONFIG [key=value ...]`` and ``continual list``; each command calls one recipe
(``continual.recipes``).

Heavy libraries (torch, Avalanche, MLflow) are imported only by the commands that need them, so ``--help`` and
``list`` answer at once.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from continual.training.experiment import PRESETS_DIR
from continual.training.experiment import presets as _presets
from continual.training.experiment import resolve_preset as resolve_config


def cmd_list(args: argparse.Namespace) -> int:
    from streams.orders import describe_streams
    from strategies.registry import available_strategies, get_strategy_class

    print("streams:")
    for line in describe_streams():
        print(f"  {line}")
    print("strategies:")
    names = available_strategies()
    width = max(map(len, names), default=0) + 2
    for name in names:
        doc = (get_strategy_class(name).__doc__ or "").strip().splitlines()
        print(f"  {name:{width}s}{doc[0] if doc else '(no description)'}")
    print("presets:")
    presets = [(preset.relative_to(PRESETS_DIR.parent).as_posix(), preset_summary(preset)) for preset in _presets()]
    width = max((len(path) for path, _ in presets), default=0) + 2
    for path, summary in presets:
        print(f"  {path:{width}s}{summary}")
    return 0


def preset_summary(path: Path) -> str:
    """What a preset does, in one line: the comment on its second line (the first line is the command)."""
    lines = path.read_text().splitlines()
    second = lines[1] if len(lines) > 1 else ""
    return second.lstrip("#").strip() if second.startswith("#") else "(no description)"


# Third-party warnings a user cannot act on, silenced where the CLI starts (real warnings stay visible).
KNOWN_NOISE = (
    # qpsolvers, imported by Avalanche's GEM plugin, when no QP solver package is installed; nothing here uses QP.
    "no QP solver found on your system",
)


def quiet_known_warnings() -> None:
    for message in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)


def cmd_run(args: argparse.Namespace) -> int:
    from continual.recipes.run import load_config, run_experiment

    run_experiment(load_config(resolve_config(args.config), overrides=args.overrides))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from continual.recipes.run import resume_experiment

    resume_experiment(args.run_dir, overrides=args.overrides, previous=args.previous)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from continual.recipes.saved import eval_run

    eval_run(args.run_dir, overrides=args.overrides)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from continual.recipes.saved import predict_file

    predict_file(args.run_dir, args.input, task=args.task, output=args.output, overrides=args.overrides)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from continual.recipes.compare import load_compare_config, run_compare

    cfg = load_compare_config(resolve_config(args.config), overrides=args.overrides)
    only = [name.strip() for name in args.runs.split(",") if name.strip()] if args.runs else None
    rows = run_compare(cfg, dry_run=args.dry_run, jobs=args.jobs, threads=args.threads, report_only=args.report,
                       only=only)
    return 1 if any(row["failed"] for row in rows) else 0


def cmd_uptrain(args: argparse.Namespace) -> int:
    from continual.recipes.uptrain import load_uptrain_config, run_uptraining

    config = None
    if args.args and "=" not in args.args[0]:
        config, args.args = resolve_config(args.args[0]), args.args[1:]
    run_uptraining(load_uptrain_config(config, overrides=args.args))
    return 0


def cmd_lm(args: argparse.Namespace) -> int:
    from continual.recipes.lm import load_lm_config, run_continual_lm

    run_continual_lm(load_lm_config(resolve_config(args.config), overrides=args.overrides))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from continual.tracking_sync import sync_run

    print(sync_run(args.run_dir, uri=args.uri).describe())
    return 0


def _known_errors() -> tuple:
    from continual.config import ConfigError
    from continual.models.backbone import BackboneError

    errors = [ConfigError, BackboneError]
    if "continual.training.run_state" in sys.modules:
        from continual.training.run_state import RunStateError

        errors.append(RunStateError)
    try:
        from streams.errors import StreamError

        errors.append(StreamError)
    except ImportError:  # pragma: no cover - the streams package always ships it
        pass
    if "continual.training" in sys.modules:  # whatever raised it imported it; do not import torch just to check
        from continual.training import NonFiniteLossError

        errors.append(NonFiniteLossError)
    return tuple(errors)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="continual", description="Continual learning on pretrained transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment from a YAML preset, with key=value overrides")
    run.add_argument("config", help="YAML file, or the name of a preset in configs/ (see `continual list`)")
    run.add_argument("overrides", nargs="*", help="e.g. training.lr=1e-4 strategy.name=ewc stream.order=2")
    run.set_defaults(func=cmd_run)
    resume = sub.add_parser("resume", help="continue a killed run from its last finished task (same folder and MLflow run)")
    resume.add_argument("run_dir", help="the run folder (tracking.output_dir/<experiment>/<run name>)")
    resume.add_argument("overrides", nargs="*", help="only keys that change no result, e.g. training.device=cuda")
    resume.add_argument("--previous", action="store_true",
                        help="continue from the state before the last one (when the last one is corrupt)")
    resume.set_defaults(func=cmd_resume)
    evaluate = sub.add_parser("eval", help="reload a run's final model and evaluate it (default: reproduces its last row)")
    evaluate.add_argument("run_dir", help="the run folder")
    evaluate.add_argument("overrides", nargs="*", help="e.g. stream.test_per_task=1000 stream.eval_split=dev")
    evaluate.set_defaults(func=cmd_eval)
    predict = sub.add_parser("predict", help="predict labels for texts with a run's model (one JSON line per input)")
    predict.add_argument("run_dir", help="the run folder")
    predict.add_argument("--input", required=True, help="JSON lines: {\"text\": ...} objects or JSON strings")
    predict.add_argument("--task", default=None, help="the task of every input; omitted: the run's router decides")
    predict.add_argument("--output", default=None, help="write the JSON lines here instead of the terminal")
    predict.add_argument("overrides", nargs="*", help="e.g. training.device=cpu")
    predict.set_defaults(func=cmd_predict)
    compare = sub.add_parser("compare", help="run a grid of presets x orders x seeds and compare them in one table")
    compare.add_argument("config", help="compare YAML (e.g. configs/compare/standard.yaml) or a preset name")
    compare.add_argument("overrides", nargs="*", help="e.g. seeds=[0,1] orders=[1] set=[training.device=cuda]")
    compare.add_argument("--dry-run", action="store_true", help="list the cells and which are done; run nothing")
    compare.add_argument("--report", action="store_true",
                         help="write and print the table and plots from the cells finished so far; run nothing")
    compare.add_argument("--jobs", type=int, default=1, help="cells run at once, as separate processes")
    compare.add_argument("--runs", default=None, metavar="NAME[,NAME...]",
                         help="run only these runs' unfinished cells (the table still shows every run's finished "
                              "cells)")
    compare.add_argument("--threads", type=int, default=None,
                         help="CPU threads per cell (default: the machine's cores split between the --jobs)")
    compare.set_defaults(func=cmd_compare)
    up = sub.add_parser("uptrain", help="convert a model to a recursive one, uptrain it on text and save it")
    up.add_argument("args", nargs="*", help="[CONFIG.yaml] then key=value overrides, e.g. training.steps=100")
    up.set_defaults(func=cmd_uptrain)
    lm = sub.add_parser("lm", help="continual language modelling on a stream of text domains (experts or dense)")
    lm.add_argument("config", help="YAML file (e.g. configs/lm/moduleformer_experts.yaml) or a preset name")
    lm.add_argument("overrides", nargs="*", help="e.g. expansion.mode=dense training.steps_per_domain=50")
    lm.set_defaults(func=cmd_lm)
    sync = sub.add_parser("sync", help="upload what a run's tracking store missed (an outage) from its journal")
    sync.add_argument("run_dir", help="the run folder (holding tracking/journal.jsonl)")
    sync.add_argument("--uri", help="upload into a new run at this tracking URI instead of the run's own store")
    sync.set_defaults(func=cmd_sync)
    lst = sub.add_parser("list", help="list named streams, strategies and presets")
    lst.set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    quiet_known_warnings()
    # Under torchrun (or `accelerate launch`) only `run` and `resume` split the work; the other commands would run N
    # times over, writing to the same places.
    if args.command not in ("run", "resume", "list") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"error: continual {args.command} does not run data-parallel; launch it without torchrun (only "
              "`continual run` and `continual resume` train on several processes)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, _known_errors()):
            print(f"error: {err}", file=sys.stderr)
            return 2 if type(err).__name__ != "NonFiniteLossError" else 1
        raise


if __name__ == "__main__":
    sys.exit(main())
