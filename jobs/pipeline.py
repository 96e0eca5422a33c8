"""Ray job entrypoint for the whole chain: ``python jobs/pipeline.py --config paper [k=v ...]``."""

from __future__ import annotations

import argparse

from histodiff.config import load_config
from histodiff.pipeline import run_pipeline
from histodiff.runtime import setup_logging


def main() -> None:
    """Parse arguments, run the pipeline under one MLflow parent run, print each stage's result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="tiny", help="preset name or YAML path")
    parser.add_argument("--stages", default=None, help="comma-separated subset, e.g. ingest,autoencoder")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. paths.root=s3://bucket/run1")
    args = parser.parse_args()
    setup_logging()
    cfg = load_config(args.config, args.overrides)
    result = run_pipeline(cfg, args.stages.split(",") if args.stages else None)
    for name, stage_result in result.stages.items():
        print(f"{name} ({result.seconds[name]:.1f} s): {stage_result}")
    print(f"MLflow parent run {result.parent_run_id} in experiment {result.experiment}")


if __name__ == "__main__":
    main()
