"""The one stage runner: spec, fingerprint, skip or run, MLflow run, completion marker, registry.

A stage is a module of :mod:`histodiff.stages` with ``VERSION``, a frozen ``Spec``, ``spec(cfg,
store) -> Spec`` (only the fields the stage uses, read from the config and from its inputs'
metadata) and ``work(spec, ctx) -> Result``. Its fingerprint is the hash of that spec plus the
stage's name and ``VERSION``, so a changed field that the work receives, or a bumped algorithm
version, always reruns it, and nothing else does. The runner writes ``_stage.json`` (the
fingerprint and the result) into the spec's ``output_uri`` after the work succeeded: a crash
leaves no marker, and the rerun resumes (training stages from their checkpoints).

While a stage runs, an attempt record (:func:`attempt_uri`) names its MLflow run; a rerun after
a killed driver continues that run when the spec is the same, or ends it KILLED and links it
to the new one: no run is left RUNNING. Before anything else, every stage sends the tracking
calls earlier commands left waiting for a server that was down (:func:`histodiff.tracking.sync_pending`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator

from pydantic import BaseModel, ConfigDict

from histodiff import console, expected, headline, mlflow_ui, registry, tracking
from histodiff.config import HistodiffConfig, RayConfig, TrackingConfig
from histodiff.storage import Store, join

log = logging.getLogger(__name__)

MARKER = "_stage.json"
ATTEMPTS_DIR = "_stage_runs"  # under paths.checkpoints: stages may clear their own output folder


class Spec(BaseModel):
    """Base of every stage spec: frozen plain data; ``output_uri`` is where the stage's marker goes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    output_uri: str


@dataclass(kw_only=True)
class StageResult:
    """Fields every stage result carries, set by the runner."""

    run_id: str | None = None
    seconds: float = 0.0
    skipped: bool = False
    registered: list[str] = field(default_factory=list)
    expected: str = ""  # how the figures compare with the preset's expected ranges (histodiff.expected)


@dataclass
class Context:
    """What a stage's work gets besides its spec: storage, placement, its MLflow run, test hooks."""

    store: Store
    ray: RayConfig
    tracker: tracking.Tracker = field(default_factory=lambda: tracking.NULL_TRACKER)
    name: str = "demo"
    checkpoints_uri: str = ""
    callbacks: tuple[Callable[..., None], ...] = ()  # training-loop callbacks (tests inject faults here)
    stage: str = ""  # the stage's name: labels its progress lines

    def run_uri(self, run_name: str) -> str:
        """Return where a training stage's Ray Train run (its checkpoints) lives."""
        return join(self.checkpoints_uri, run_name)


def stage_name(stage: ModuleType) -> str:
    """Return a stage's name: its module's name."""
    return stage.__name__.rsplit(".", 1)[-1]


def fingerprint(stage: ModuleType, spec: Spec) -> str:
    """Return the hash of a stage's spec, name and VERSION (what decides skip or rerun)."""
    data = {"stage": stage_name(stage), "version": stage.VERSION, "spec": spec.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def spec_params(spec: Spec) -> dict[str, str]:
    """Return the spec as flat ``{"a.b": value}`` MLflow params (long lists are kept as JSON)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)

    walk("", spec.model_dump(mode="json"))
    return out


def _result_from(stage: ModuleType, data: dict[str, Any]) -> Any:
    cls = stage.Result
    return cls.from_dict(data) if hasattr(cls, "from_dict") else cls(**data)


def upstream_fingerprint(output_uri: str, store: Store, stage: str) -> str:
    """Return the fingerprint a finished stage wrote at ``output_uri``, or raise naming the stage to run."""
    uri = join(output_uri, MARKER)
    if not store.exists(uri):
        raise FileNotFoundError(f"{output_uri!r} holds no finished {stage} output (no {MARKER}); run "
                                f"`histodiff run {stage}` first")
    return store.read_json(uri)["fingerprint"]


def finished(stage: ModuleType, spec: Spec, store: Store) -> Any | None:
    """Return the stored result when the stage finished with this exact spec, else None."""
    uri = join(spec.output_uri, MARKER)
    if not store.exists(uri):
        return None
    done = store.read_json(uri)
    if done.get("fingerprint") != fingerprint(stage, spec):
        return None
    return dataclasses.replace(_result_from(stage, done["result"]), skipped=True, registered=[])


def run_stage(stage: ModuleType, cfg: HistodiffConfig, *, parent_run_id: str | None = None,
              callbacks: tuple[Callable[..., None], ...] = (), position: str = "") -> Any:
    """Run one stage (or skip it when finished with the same spec); return its result with its MLflow run id."""
    from histodiff.runtime import init_ray

    name = stage_name(stage)
    label = f"{name} ({position})" if position else name
    start = time.perf_counter()
    store = Store(cfg.storage)
    spec = stage.spec(cfg, store)  # reads and checks the inputs: before any Ray or MLflow resource
    tracking.sync_pending(cfg, store)
    done = finished(stage, spec, store)
    if done is not None:
        console.say("%s: finished earlier with the same spec (%s); skipped", label, fingerprint(stage, spec))
        return dataclasses.replace(done, seconds=round(time.perf_counter() - start, 3))
    console.say("%s: started", label)
    init_ray(cfg)
    key = f"{name}-{hashlib.sha256(spec.output_uri.encode()).hexdigest()[:10]}"
    opener = functools.partial(tracking.stage_run, cfg, name, params=spec_params(spec), parent_run_id=parent_run_id)
    with resumable_run(cfg, store, key, fingerprint(stage, spec), opener) as tracker:
        tracker.set_tags(mlflow_ui.stage_tags(name))
        if parent_run_id is None:  # `histodiff run STAGE`: the experiment may be new, so it gets its UI setup here
            mlflow_ui.prepare_experiment(tracker, cfg)
        ctx = Context(store, cfg.ray, tracker, cfg.name, cfg.paths.checkpoints, callbacks, stage=name)
        result = stage.work(spec, ctx)
        result = _judge(name, cfg.name, result, tracker)
        about = f"Preset `{cfg.name}`, stage `{name}`: {headline.summary_text(name, headline.figures(name, result))}" \
            f" ({result.expected})."
        registered = register_models(stage, result, store, cfg.tracking, tracker, about)
        result = dataclasses.replace(result, run_id=tracker.run_id, seconds=round(time.perf_counter() - start, 3),
                                     registered=registered)
        console.say("%s: done in %s; %s; %s", label, console.duration(result.seconds),
                    headline.summary_text(name, headline.figures(name, result)) or "no figures", result.expected)
        store.write_json(join(spec.output_uri, MARKER), {
            "stage": name, "version": stage.VERSION, "fingerprint": fingerprint(stage, spec),
            "run_id": tracker.run_id, "result": dataclasses.asdict(result)})
    return result


def attempt_uri(cfg: HistodiffConfig, key: str) -> str:
    """Return where the runner records the MLflow run of an attempt in progress (``key``: stage and output)."""
    return join(cfg.paths.checkpoints, ATTEMPTS_DIR, f"{key}.json")


@contextlib.contextmanager
def resumable_run(cfg: HistodiffConfig, store: Store, key: str, fp: str,
                  opener: Callable[..., Any]) -> Iterator[tracking.Tracker]:
    """Open a run with ``opener(resume_run_id=...)``, continuing one an earlier attempt left open; yield its Tracker.

    An attempt killed with the same fingerprint is continued (its run id comes back); one with
    another fingerprint has its run ended KILLED and tagged with the new run's id. The record is
    removed when the body succeeds, so a failed attempt is continued by its rerun too.
    """
    uri = attempt_uri(cfg, key)
    previous = store.read_json(uri) if cfg.tracking.enabled and store.exists(uri) else {}
    resume = previous.get("run_id") if previous.get("fingerprint") == fp else None
    with opener(resume_run_id=resume) as tracker:
        if tracker.run_id:
            tracker.store = store
            if previous.get("run_id") and previous["run_id"] != tracker.run_id:
                tracking.end_stale_run(cfg, previous["run_id"], tracker.run_id)
            store.write_json(uri, {"key": key, "fingerprint": fp, "run_id": tracker.run_id})
        yield tracker
    if tracker.run_id:
        store.delete(uri)


def _judge(name: str, preset: str, result: Any, tracker: tracking.Tracker) -> Any:
    """Log the stage's key figures, compare them with the preset's expected ranges; return the judged result."""
    figures = headline.figures(name, result)
    tracker.log_metrics(figures)
    verdict = expected.check(preset, name, figures).text()
    note = f"Stage `{name}` of preset `{preset}`: {headline.summary_text(name, figures, limit=8) or 'no figures'}." \
        f"\n\nExpected range: {verdict}."
    tracker.set_tags({mlflow_ui.EXPECTED_TAG: verdict, mlflow_ui.NOTE_TAG: note})
    return dataclasses.replace(result, expected=verdict)


def register_models(stage: ModuleType, result: Any, store: Store, tracking_cfg: TrackingConfig,
                    tracker: tracking.Tracker, description: str = "") -> list[str]:
    """Register the models a stage exported (``MODELS``: kind -> result field with the URI); return names."""
    out = []
    for kind, uri_field in getattr(stage, "MODELS", {}).items():
        registered = registry.register_export(tracking_cfg, store, tracker, kind, getattr(result, uri_field),
                                              description)
        if registered is not None:
            out.append(f"{registered.name}/{registered.version}")
    return out
