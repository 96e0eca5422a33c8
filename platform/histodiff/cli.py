"""The ``histodiff`` command: run, submit, demo, sweep, tracking sync and bench.

``histodiff run STAGE|pipeline --config tiny [k=v ...]`` runs on an embedded local Ray;
``histodiff submit STAGE|pipeline|sweep --address http://HEAD:8265 ...`` runs the same
command on a Ray cluster through the job API (see :mod:`histodiff.submit`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

from histodiff.config import ConfigError, HistodiffConfig, load_config
from histodiff.runtime import setup_logging

# Stage names without importing the stages (torch, Ray): the parser must answer in well under a second.
STAGE_NAMES = ("ingest", "autoencoder", "encode", "pretrain", "pseudolabel", "classifier", "selector", "synthesize",
               "evaluate")

log = logging.getLogger(__name__)


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
        print(mlflow_hint(cfg, result.parent_run_id))
    else:
        _print_result(run_stage(by_name(args.stage), cfg))
    return 0


def mlflow_hint(cfg: HistodiffConfig, parent_run_id: str | None) -> str:
    """Return where to look in MLflow for this run: the UI command, experiment and run."""
    from histodiff.tracking import scrub, tracking_uri

    if not cfg.tracking.enabled:
        return "MLflow tracking was off (tracking.enabled=false)."
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:"):
        ui = f"mlflow ui --backend-store-uri {uri}   # then open http://127.0.0.1:5000"
    else:
        ui = f"open {scrub(uri)} in a browser"
    return (f"MLflow: {ui}\n  experiment: {cfg.tracking.experiment}\n"
            f"  parent run: {cfg.name}/pipeline (id {parent_run_id}); stages are its nested runs\n"
            f"  registered models: {cfg.tracking.registry_prefix}-<kind>@{cfg.tracking.champion_alias}")


def cmd_demo(args: argparse.Namespace) -> int:
    """Write the built-in data, run the whole pipeline on the tiny preset, print the table."""
    from histodiff.data.builtin import write_builtin_data
    from histodiff.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    data_root = os.path.dirname(cfg.paths.labeled_source.rstrip("/")) if cfg.paths.labeled_source else None
    data_root = os.path.dirname(data_root) if data_root else "outputs/builtin"
    log.info("writing the built-in tissue data under %s", data_root)
    write_builtin_data(data_root)
    result = run_pipeline(cfg)
    for name, seconds in result.seconds.items():
        print(f"{name:<12} {seconds:8.1f} s")
    evaluation = result.stages.get("evaluate")
    if evaluation is not None:
        print(evaluation.table())
    print(mlflow_hint(cfg, result.parent_run_id))
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
    print(mlflow_hint(cfg, result.parent_run_id).replace("/pipeline", "/sweep").replace("stages", "trials"))
    # Every trial with synthetic tiles failed: the sweep measured nothing, and says so in its exit code.
    return 1 if result.all_synthetic_failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit a stage, the pipeline or the sweep to a Ray cluster; follow its logs."""
    from histodiff.submit import submit

    return submit(args.stage, args.address, args.config, args.overrides, token=args.token, pip=args.pip,
                  follow=not args.no_wait, space=getattr(args, "space", None))


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
    merged = runner.run_benchmarks(args.output, only=args.area, workdir=args.workdir, quick=args.quick)
    for key, value in merged.items():
        print(f"{key}: {value.get('value')} {value.get('unit', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``histodiff`` command."""
    parser = argparse.ArgumentParser(prog="histodiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    stages = [*STAGE_NAMES, "pipeline"]

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default="tiny", help="preset name (tiny, paper) or a YAML path")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. denoiser.steps=200")

    p = sub.add_parser("run", help="run a stage or the whole pipeline on a local (embedded) Ray")
    p.add_argument("stage", choices=stages)
    p.add_argument("--stages", default=None, help="pipeline only: comma-separated subset, e.g. ingest,autoencoder")
    common(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("submit", help="submit a stage, the pipeline or the sweep to a Ray cluster")
    p.add_argument("stage", choices=[*stages, "sweep"])
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--token", default=None, help="Ray auth token (default: $RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    p.add_argument("--pip", action="store_true", help="also install the package's dependencies on the cluster")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following logs")
    p.add_argument("--space", default=None, help="sweep only: search-space YAML inside this repository")
    common(p)
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("demo", help="built-in data + the whole pipeline on the tiny preset")
    common(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("sweep", help="Ray Tune sweep of guidance scale x selection threshold")
    p.add_argument("--space", default=None, help="search-space YAML, e.g. tuning/search_space.yaml")
    common(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("tracking", help="send tracking calls that waited while the MLflow server was down")
    p.add_argument("action", choices=["sync"])
    common(p)
    p.set_defaults(fn=cmd_tracking)

    p = sub.add_parser("bench", help="run benchmarks (from a checkout) and merge them into bench/results.json")
    p.add_argument("area", nargs="?", default=None, help="one area (a module in bench/areas/); default all")
    p.add_argument("--output", default="bench/results.json")
    p.add_argument("--workdir", default="bench/_work")
    p.add_argument("--quick", action="store_true", help="development mode where an area has one (validate: one "
                   "budget, 2 draws, ~12 min); figures go to <workdir>/<area>-quick.json, never to --output")
    p.set_defaults(fn=cmd_bench)
    return parser


def _sigterm(signum: int, frame: Any) -> None:
    # A cluster stopping the job sends SIGTERM: unwind so open MLflow runs end FAILED.
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Return the parsed command line; overrides may come before or after the options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``histodiff`` console script; return the exit code."""
    args = parse_args(argv)
    setup_logging()
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"histodiff: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from histodiff.storage import StorageError  # not at the top: pyarrow would slow every --help

        if not isinstance(exc, StorageError):
            raise
        print(f"histodiff: {exc}", file=sys.stderr)  # names the URI and the fix; secrets already redacted
        return 1


if __name__ == "__main__":
    sys.exit(main())
