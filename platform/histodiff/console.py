"""What a user sees on the console: a line per stage, a progress line on long work, quiet libraries.

By default only histodiff speaks: Ray Data's progress bars, Ray's internal logs (its actors'
``core_worker.cc`` errors, the Train controller's state polling), library warnings and download
bars are off, and of the lines Ray forwards from its workers only those that histodiff wrote
reach the console. ``--verbose`` (``HISTODIFF_VERBOSE=1``) shows everything. Progress lines are
plain lines at most every ``PROGRESS_EVERY_S`` seconds, so a log file reads as well as a terminal.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
import warnings
from typing import Any

VERBOSE_ENV = "HISTODIFF_VERBOSE"
# Worker output lines that contain this reach the driver's console; every other one is dropped.
MARK = "histodiff"
PROGRESS_EVERY_S = 20.0

log = logging.getLogger("histodiff.console")

# Set before Ray, Ray Data, diffusers and MLflow read them; workers get them through runtime.worker_env.
QUIET_ENV = {
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_BACKEND_LOG_LEVEL": "fatal",  # Ray's C++ "core_worker.cc ... E" lines, also from the driver itself
    "RAY_DATA_LOG_LEVEL": "ERROR",  # else: "Progress bars disabled", "the Dataset job will hang"
    "DIFFUSERS_VERBOSITY": "error",  # "pip install accelerate", 14 lines per model load
    "TRANSFORMERS_VERBOSITY": "error",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow sets its logger's level when it is imported
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # its links open GenAI mode; histodiff prints its own
    "PYTHONWARNINGS": "ignore::UserWarning,ignore::FutureWarning,ignore::DeprecationWarning",
}
_QUIET_LOGGERS = {"ray": logging.ERROR, "ray.data": logging.ERROR, "ray.train": logging.ERROR,
                  "ray.tune": logging.ERROR, "mlflow": logging.WARNING, "alembic": logging.WARNING,
                  "diffusers": logging.ERROR, "urllib3": logging.ERROR, "filelock": logging.WARNING}


def verbose() -> bool:
    """Return True when the user asked for everything (``--verbose`` or ``HISTODIFF_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def quiet_env() -> dict[str, str]:
    """Return the environment settings that silence libraries (empty with ``--verbose``)."""
    return {} if verbose() else dict(QUIET_ENV)


class _Format(logging.Formatter):
    # histodiff's own console lines read as sentences; everything else keeps its level and source.
    def format(self, record: logging.LogRecord) -> str:
        """Return ``HH:MM:SS message`` for histodiff's console lines, else with level and logger."""
        stamp = self.formatTime(record, "%H:%M:%S")
        if record.name == log.name and record.levelno == logging.INFO:
            return f"{stamp} {record.getMessage()}"
        return f"{stamp} {record.levelname} {record.name}: {record.getMessage()}"


def setup(verbose_mode: bool = False) -> None:
    """Configure logging and quiet the libraries once per process (``verbose_mode`` shows everything)."""
    if verbose_mode:
        os.environ[VERBOSE_ENV] = "1"
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(_Format())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    quiet_libraries()


def quiet_libraries() -> None:
    """Silence library loggers, warnings and progress bars unless verbose (call again after importing Ray)."""
    if verbose():
        logging.getLogger("histodiff").setLevel(logging.DEBUG if os.environ.get("HISTODIFF_DEBUG") else logging.INFO)
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    # histodiff's own detail (counts, paths) is for --verbose; warnings and errors always show.
    logging.getLogger("histodiff").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False


def say(message: str, *args: Any) -> None:
    """Print one histodiff console line (always shown, also without ``--verbose``)."""
    log.info(message, *args)


def duration(seconds: float) -> str:
    """Return seconds as ``45s``, ``3m05s`` or ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(label: str, done: int, total: int, unit: str, rate: float | None, eta_s: float | None,
                  figures: dict[str, float] | None = None) -> str:
    """Return ``label  done/total unit  figure value ...  rate unit/s  ETA 1m05s`` (the progress format)."""
    parts = [f"{MARK} {label}", f"{done}/{total} {unit}"]
    parts += [f"{k} {v:.4g}" for k, v in (figures or {}).items() if v is not None]
    if rate:
        parts.append(f"{rate:.3g} {unit}/s" if rate >= 0.1 else f"{60 * rate:.3g} {unit}/min")
    if eta_s is not None and done < total:
        parts.append(f"ETA {duration(eta_s)}")
    return "  ".join(parts)


class Progress:
    """Progress of one long piece of work: a line at most every ``every_s`` seconds and a final one."""

    def __init__(self, label: str, total: int, unit: str, every_s: float = PROGRESS_EVERY_S,
                 emit: Any = None) -> None:
        self.label, self.total, self.unit, self.every_s = label, max(int(total), 1), unit, every_s
        self.done = 0
        self._start = self._last = time.monotonic()
        # In a Ray worker a plain print reaches the driver (through the worker-log filter).
        self._emit = emit or (lambda line: print(line, flush=True))

    def update(self, done: int, figures: dict[str, float] | None = None, rate: float | None = None,
               force: bool = False) -> None:
        """Record ``done`` units; print a line when ``every_s`` passed since the last one, or when ``force``.

        Work that ends within ``every_s`` prints nothing: the stage's end line says enough.
        """
        self.done = min(int(done), self.total)
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        elapsed = now - self._start
        rate = rate if rate is not None else (self.done / elapsed if elapsed > 0 else None)
        eta = (self.total - self.done) / rate if rate else None
        self._emit(progress_line(self.label, self.done, self.total, self.unit, rate, eta, figures))

    def finish(self, note: str = "") -> None:
        """Print the closing line: all units done (``note`` says why it stopped early, e.g. quota reached)."""
        elapsed = time.monotonic() - self._start
        line = progress_line(self.label, self.total, self.total, self.unit, self.done / elapsed if elapsed else None,
                             None)
        self._emit(f"{line}  {note}".rstrip() + f"  ({duration(elapsed)})")


def filter_worker_output() -> None:
    """Forward only histodiff's lines from Ray workers to the console (all lines with ``--verbose``)."""
    if verbose():
        return
    try:  # Ray's driver-side printer of worker output has no public hook; fall back to showing all
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        if "ray_print_logs" not in [name for name, _ in dispatcher.handlers]:
            return  # log_to_driver=False, or already filtered
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", _print_histodiff_lines)
    except Exception:  # a Ray without this internal: show everything rather than nothing
        return


_RECENT: "collections.deque[str]" = collections.deque(maxlen=64)


def _print_histodiff_lines(data: dict) -> None:
    from ray._private import worker as ray_worker

    # Ray can forward a line twice (its log monitor reads the worker's file and Ray Train relays it).
    lines = [line for line in data.get("lines", []) if MARK in line and line not in _RECENT]
    _RECENT.extend(lines)
    if lines:
        # Our lines carry their own label: Ray's "(RayTrainWorker pid=...)" prefix only adds noise.
        ray_worker.print_to_stdstream({**data, "lines": lines}, ignore_prefix=True)
