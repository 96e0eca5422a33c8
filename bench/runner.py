"""Benchmark runner: every ``bench.areas.<area>`` module's ``run(workdir)`` merged into one JSON.

The results file is read, updated and written back (atomically) after each area, so running
one area keeps every other area's figures and an interrupted run keeps the areas it finished.
An area that fails is reported and the others still run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import pkgutil
import subprocess
from pathlib import Path

from histodiff.storage import Store

log = logging.getLogger(__name__)

AREAS_DIR = Path(__file__).resolve().parent / "areas"


def areas() -> list[str]:
    """Return the names of the benchmark areas (the modules in bench/areas/)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(AREAS_DIR)]) if not m.name.startswith("_"))


def code_version() -> str:
    """Return ``code <short commit>`` of the checkout the benchmarks run from (``+ uncommitted changes`` when
    its tracked files differ from that commit), or ``code of unknown version`` outside a git checkout."""
    root = AREAS_DIR.parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "code of unknown version"
    return f"code {commit}" + (" + uncommitted changes" if dirty else "")


def check_entry(key: str, value: object) -> None:
    """Raise ValueError unless a figure has value, unit, goal and measured."""
    if not isinstance(value, dict) or not {"value", "unit", "goal", "measured"} <= set(value):
        raise ValueError(f"benchmark figure {key!r} must be a dict with value, unit, goal and measured; got {value!r}")


def merge_into(output: str, figures: dict[str, dict]) -> None:
    """Merge ``figures`` into the JSON file ``output`` (read, update, atomic write)."""
    results = json.loads(Path(output).read_text()) if os.path.isfile(output) else {}
    results.update(figures)
    Store().write_bytes(output, (json.dumps(results, indent=2, sort_keys=True) + "\n").encode())


def run_benchmarks(output: str, only: str | None = None, workdir: str = "bench/_work",
                   quick: bool = False, overrides: tuple[str, ...] = (),
                   subset: dict[str, tuple] | None = None) -> dict[str, dict]:
    """Run one area (or all), merge the figures into ``output``; return the figures just measured.

    ``quick`` runs the areas that have a development mode in it and writes their figures to
    ``<workdir>/<area>-quick.json``, never into ``output``: quick figures are not results.
    ``overrides`` (``key.sub=value``, one area only, one whose ``run`` takes them) measure a variant
    of that area's recipe: its figures go to ``<workdir>/<area>-variant.json`` (or the quick file)
    with the overrides in each figure's ``measured``, never into ``output``.
    ``subset`` (one area only, keyword arguments its ``run`` takes: validate's ``budgets`` and ``arms``) runs part
    of the area's protocol: its figures go to the variant file too, never into ``output``.
    """
    names = areas()
    if only is not None:
        if only not in names:
            raise ValueError(f"unknown benchmark area {only!r}; choose one of {names}")
        names = [only]
    overrides = tuple(overrides)
    subset = {k: tuple(v) for k, v in (subset or {}).items() if v}
    options = {**({"overrides": overrides} if overrides else {}), **subset}
    for option, value in options.items():
        if only is None:
            raise ValueError(f"{option} {list(value)} need one benchmark area (for example `validate`)")
        if option not in inspect.signature(importlib.import_module(f"bench.areas.{only}").run).parameters:
            raise ValueError(f"benchmark area {only!r} takes no {option} (got {list(value)})")
    measured: dict[str, dict] = {}
    failed = []
    code = code_version()  # before any area runs: the code that runs, not what an edit meanwhile leaves
    for name in names:
        area_dir = os.path.join(workdir, name)
        os.makedirs(area_dir, exist_ok=True)
        log.info("benchmark area %s", name)
        try:
            area = importlib.import_module(f"bench.areas.{name}")
            kwargs: dict[str, object] = dict(options)
            if quick:
                if "quick" not in inspect.signature(area.run).parameters:
                    log.info("benchmark area %s has no quick mode; skipped", name)
                    continue
                kwargs["quick"] = True
            figures = area.run(area_dir, **kwargs)
            for key, value in figures.items():
                check_entry(key, value)
                # Every figure names the code it was measured with: a figure of stale code is a defect.
                value["measured"] = f"{value['measured']}, {code}"
                if overrides:
                    value["measured"] = f"{value['measured']} (overrides: {' '.join(overrides)})"
                for option, part in subset.items():
                    value["measured"] = f"{value['measured']} ({option}: {' '.join(map(str, part))})"
        except Exception as exc:  # one broken area must not lose the others' figures
            log.error("benchmark area %s failed: %s", name, exc)
            failed.append(name)
            continue
        measured.update(figures)
        # After each area: an interrupted run keeps the finished areas.
        side = "quick" if quick else "variant" if options else None
        merge_into(os.path.join(workdir, f"{name}-{side}.json") if side else output, figures)
    if failed:
        raise RuntimeError(f"benchmark area(s) {failed} failed (see the log); the others were merged into {output}")
    return measured
