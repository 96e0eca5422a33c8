"""The ``histodiff`` command: run, submit, demo, sweep, tracking sync and bench.

``histodiff run STAGE|pipeline --config tiny [k=v ...]`` runs on an embedded local Ray;
``histodiff submit STAGE|pipeline|sweep --address http://HEAD:8265 ...`` runs the same
command on a Ray cluster through the job API (see :mod:`histodiff.submit`). User errors end
with one line and exit code 2 (:mod:`histodiff.errors`); ``--verbose`` shows everything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from histodiff import console
from histodiff.config import HistodiffConfig, load_config
from histodiff.errors import EXIT_USER_ERROR, UserError, user_message
from histodiff.runtime import setup_logging

# Stage names without importing the stages (torch, Ray): the parser must answer in well under a second.
STAGE_NAMES = ("ingest", "autoencoder", "encode", "pretrain", "pseudolabel", "classifier", "selector", "synthesize",
               "evaluate")



def _print_result(result: Any) -> None:
    import dataclasses

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        from histodiff.tracking import scrub

        for f in dataclasses.fields(result):
            value = getattr(result, f.name)
            text = scrub(value) if not isinstance(value, (list, dict)) or len(str(value)) < 400 else \
                f"<{type(value).__name__} of {len(value)}>"
            print(f"{f.name}: {text}")
    else:
        print(result)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one stage or the pipeline locally; return the exit code."""
    from histodiff.pipeline import run_pipeline
    from histodiff.runner import run_stage
    from histodiff.stages import by_name

    cfg = load_config(args.config, args.overrides)
    if args.stage == "pipeline":
        result = run_pipeline(cfg, args.stages.split(",") if args.stages else None)
        for name, stage_result in result.stages.items():
            print(f"== {name} ({result.seconds[name]:.1f} s)")
            _print_result(stage_result)
        print(mlflow_hint(cfg, result.parent_run_id, result.experiment_id))
    else:
        _print_result(run_stage(by_name(args.stage), cfg))
    return 0


def mlflow_hint(cfg: HistodiffConfig, parent_run_id: str | None, experiment_id: str | None = None,
                kind: str = "pipeline") -> str:
    """Return where to look in MLflow: the exact UI command, the experiment and parent run URLs, the models."""
    from histodiff import mlflow_ui
    from histodiff.tracking import scrub, tracking_uri

    if not cfg.tracking.enabled:
        return "MLflow tracking was off (tracking.enabled=false)."
    uri = tracking_uri(cfg)
    lines = ["MLflow:"]
    if uri.startswith("sqlite:"):
        lines.append(f"  start the UI:  {mlflow_ui.ui_command(uri)}")
    else:
        lines.append(f"  tracking server: {scrub(uri)}")
    lines.append(f"  experiment:    {cfg.tracking.experiment}"
                 + (f"  {mlflow_ui.experiment_url(uri, experiment_id)}" if experiment_id else ""))
    if parent_run_id:
        run = f"{cfg.name}/{kind} (id {parent_run_id})"
        url = f"  {mlflow_ui.run_url(uri, experiment_id, parent_run_id)}" if experiment_id else ""
        lines.append(f"  parent run:    {run}; stages are its nested runs{url}")
    lines.append(f"  models:        {cfg.tracking.registry_prefix}-<kind>@{cfg.tracking.champion_alias}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Write the built-in data, run the whole pipeline on the tiny preset, print the table."""
    from histodiff.data.builtin import write_builtin_data
    from histodiff.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    data_root = os.path.dirname(cfg.paths.labeled_source.rstrip("/")) if cfg.paths.labeled_source else None
    data_root = os.path.dirname(data_root) if data_root else "outputs/builtin"
    console.say("writing the built-in tissue data under %s", data_root)
    write_builtin_data(data_root)
    result = run_pipeline(cfg)
    for name, stage_result in result.stages.items():
        print(f"{name:<12} {stage_result.seconds:8.1f} s  {stage_result.expected}")
    evaluation = result.stages.get("evaluate")
    if evaluation is not None:
        print(evaluation.table())
    print(mlflow_hint(cfg, result.parent_run_id, result.experiment_id))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or resume) the Ray Tune sweep and print the recommendation."""
    from histodiff import sweep
    from histodiff.sweep_report import summary_text

    cfg = load_config(args.config, args.overrides)
    if args.space:
        cfg = sweep.load_space(cfg, args.space)
    result = sweep.run(cfg)
    print(summary_text(result))
    print(f"results: {result.artifacts.get('results.csv')}  heatmap: {result.artifacts.get('heatmap.png')}")
    print(mlflow_hint(cfg, result.parent_run_id, kind="sweep").replace("stages", "trials"))
    # Every trial with synthetic tiles failed: the sweep measured nothing, and says so in its exit code.
    return 1 if result.all_synthetic_failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a stage, the pipeline or the sweep to a Ray cluster; follow its logs."""
    from histodiff.submit import submit

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("submit needs the cluster: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return submit(args.stage, address, args.config, args.overrides, token=args.token, pip=args.pip,
                  follow=not args.no_wait, space=getattr(args, "space", None), stages=args.stages)


def cmd_tracking(args: argparse.Namespace) -> int:
    """Send the tracking calls earlier commands left waiting for a server that was down; 1 while some still wait."""
    from histodiff.storage import Store
    from histodiff.tracking import buffer_settings, sync_pending, waiting_runs

    cfg = load_config(args.config, args.overrides)
    if not cfg.tracking.enabled:
        print("histodiff: tracking.enabled=false; nothing to sync", file=sys.stderr)
        return 2
    done = sync_pending(cfg, Store(cfg.storage))
    left = waiting_runs(cfg)
    for run_id, sent in done:
        print(f"run {run_id}: sent {sent} calls")
    where = buffer_settings(cfg).root
    print(f"{len(done)} run(s) synced; {len(left)} still waiting in {where}" if left else
          f"{len(done)} run(s) synced; nothing waits in {where}")
    return 1 if left else 0


def checkout_bench_runner() -> Any:
    """Return the ``bench.runner`` module of the checkout in the current directory, or None outside a checkout."""
    import importlib

    root = os.getcwd()
    if not os.path.isfile(os.path.join(root, "bench", "runner.py")):
        return None
    # The benchmarks sit next to the package in the repository; an installed histodiff has none.
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("bench.runner")


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmarks (one area or all) and merge them into the results JSON; 2 outside a checkout."""
    runner = checkout_bench_runner()
    if runner is None:
        print("histodiff: run `histodiff bench` from a histodiff checkout; benchmarks are not part of the installed "
              "package", file=sys.stderr)
        return 2
    merged = runner.run_benchmarks(args.output, only=args.area, workdir=args.workdir, quick=args.quick,
                                   overrides=tuple(args.overrides),
                                   subset={"budgets": args.budgets, "arms": args.arms})
    for key, value in merged.items():
        print(f"{key}: {value.get('value')} {value.get('unit', '')}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and exit code 2), not the usage block."""

    def error(self, message: str) -> Any:  # argparse's contract: never returns
        """Print ``histodiff CMD: MESSAGE (see ... --help)`` and exit 2."""
        print(f"{self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("histodiff")
    except metadata.PackageNotFoundError:  # run from a source tree without an install
        return "unknown (not installed)"


_EXAMPLES = {
    "run": "example: histodiff run pipeline --config tiny --stages ingest,autoencoder autoencoder.steps=50",
    "submit": "example: histodiff submit pipeline --config paper --address http://HEAD:8265",
    "demo": "example: histodiff demo   (then start the MLflow UI with the command it prints)",
    "sweep": "example: histodiff sweep --config tiny --space tuning/search_space.yaml",
    "bench": "example: histodiff bench tracking",
    "tracking": "example: histodiff tracking sync --config tiny   (after the MLflow server is back)",
}


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``histodiff`` command."""
    parser = _Parser(prog="histodiff", description="Turn unlabeled pathology tiles into labeled training data "
                     "(latent diffusion + classifier guidance) on Ray, tracked in MLflow.",
                     epilog="example: histodiff demo", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"histodiff {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything: library logs, Ray's progress bars, tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    stages = [*STAGE_NAMES, "pipeline"]

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        """Return the subcommand's parser: its help, one example, and --verbose."""
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show everything: library logs, Ray's progress bars, tracebacks")
        return p

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a YAML path (default: tiny)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="optional dotted overrides of the config, e.g. denoiser.steps=200")

    p = command("run", "run a stage or the whole pipeline on a local (embedded) Ray")
    p.add_argument("stage", choices=stages, metavar="STAGE", help=f"one of: {', '.join(stages)}")
    stages_help = "pipeline only: comma-separated subset, e.g. ingest,autoencoder"
    p.add_argument("--stages", default=None, help=stages_help)
    common(p)
    p.set_defaults(fn=cmd_run)

    p = command("submit", "submit a stage, the pipeline or the sweep to a Ray cluster")
    p.add_argument("stage", choices=[*stages, "sweep"], metavar="STAGE", help=f"one of: {', '.join(stages)}, sweep")
    p.add_argument("--address", default=None, help="Ray dashboard address, e.g. http://HEAD:8265 "
                   "(default: $RAY_ADDRESS)")
    p.add_argument("--token", default=None, help="Ray auth token (default: $RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    p.add_argument("--pip", action="store_true", help="also install the package's dependencies on the cluster")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    p.add_argument("--space", default=None, help="sweep only: search-space YAML inside this repository")
    p.add_argument("--stages", default=None, help=stages_help)
    common(p)
    p.set_defaults(fn=cmd_submit)

    p = command("demo", "write the built-in data and run the whole pipeline on the tiny preset")
    common(p)
    p.set_defaults(fn=cmd_demo)

    p = command("sweep", "Ray Tune sweep of guidance scale x selection threshold")
    p.add_argument("--space", default=None, help="search-space YAML, e.g. tuning/search_space.yaml")
    common(p)
    p.set_defaults(fn=cmd_sweep)

    p = command("tracking", "send tracking calls that waited while the MLflow server was down")
    p.add_argument("action", choices=["sync"])
    common(p)
    p.set_defaults(fn=cmd_tracking)

    p = command("bench", "run benchmarks (from a checkout) and merge them into bench/results.json")
    p.add_argument("area", nargs="?", default=None, help="one area (a module in bench/areas/); default all")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="a variant of one area's recipe (validate: dotted config overrides, for example "
                        "synthesis.strength=0.7); its figures go to <workdir>/<area>-variant.json (or -quick.json), "
                        "never to --output")
    p.add_argument("--output", default="bench/results.json")
    p.add_argument("--workdir", default="bench/_work")
    p.add_argument("--quick", action="store_true", help="development mode where an area has one (validate: one "
                   "budget, 2 draws, about 10 min on 2 idle cores); figures go to <workdir>/<area>-quick.json, "
                   "never to --output")
    p.add_argument("--budgets", type=int_list, default=(), metavar="N,N",
                   help="validate: only these labels-per-class budgets, for example 2,5; figures go to "
                        "<workdir>/validate-variant.json, never to --output")
    p.add_argument("--arms", type=lambda text: tuple(a for a in text.split(",") if a), default=(), metavar="ARM,ARM",
                   help="validate: train only these arms beside the baseline (an ablation: augmented); figures go "
                        "to <workdir>/validate-variant.json, never to --output")
    p.set_defaults(fn=cmd_bench)
    return parser


def int_list(text: str) -> tuple[int, ...]:
    """Return ``"2,5"`` as ``(2, 5)``; argparse turns the ValueError into one clear error."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None


def _sigterm(signum: int, frame: Any) -> None:
    # A cluster stopping the job sends SIGTERM: unwind so open MLflow runs end FAILED.
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the parsed command line; overrides may come before or after the options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    options = [e for e in extra if e.startswith("-")]
    if options or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized argument(s): {' '.join(options or extra)}")
    for item in extra:
        if "=" not in item:
            parser.error(f"override {item!r} has no '=': write it as {item}=VALUE")
    if extra:
        args.overrides = [*args.overrides, *extra]
    for item in getattr(args, "overrides", []):
        if "=" not in item:
            parser.error(f"override {item!r} has no '=': write it as {item}=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histodiff`` console script; return the exit code (2: a user error)."""
    args = parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return args.fn(args)
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise  # a bug: keep the traceback
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"histodiff: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
