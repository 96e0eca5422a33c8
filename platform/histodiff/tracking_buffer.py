"""MLflow calls that could not be made, kept on local disk in order until the server is back.

:class:`histodiff.tracking.Tracker` writes here while its server is unreachable and replays
from here when it answers again (or at the end of the stage, or in ``histodiff tracking sync``).
One folder per run under ``tracking.buffer_dir`` (default ``~/.cache/histodiff/tracking-buffer``)::

    <run_id>/run.json                      the server (credentials redacted); "closed" once its owner ended it
    <run_id>/ops-<host>-<pid>-<rand>.jsonl one process's calls, a JSON object a line, in call order
    <run_id>/ops-....jsonl.sent            how many of those lines reached MLflow (a replay resumes there)
    <run_id>/files/<rand>/<name>           artifacts logged during the outage (copies: callers' files vanish)

Nothing secret is written: params, tags and text were scrubbed by the tracker before they got here.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

from histodiff.storage import join, redact_url

log = logging.getLogger(__name__)

RUN_META = "run.json"
_SEGMENT_PREFIX = "ops-"
# MLflow's log_batch limits: replayed metrics, params and tags go in batches this size.
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}


class Unreachable(ConnectionError):
    """The tracking server did not answer; the call stays buffered."""


@dataclass(frozen=True)
class BufferSettings:
    """Where calls wait during an outage, how much may wait, and how often the server is looked for."""

    root: str
    max_mb: float = 1024.0
    retry_s: float = 30.0
    probe_timeout_s: float = 5.0

    def as_dict(self) -> dict[str, Any]:
        """Return the settings as plain data (they travel to Ray Train workers in the loop config)."""
        return asdict(self)


def default_root() -> str:
    """Return the default buffer folder, ``~/.cache/histodiff/tracking-buffer``."""
    return os.path.join(os.path.expanduser("~"), ".cache", "histodiff", "tracking-buffer")


def run_dir(root: str, run_id: str) -> str:
    """Return the buffer folder of one run."""
    return os.path.join(root, run_id)


def read_meta(path: str) -> dict[str, Any]:
    """Return a run folder's ``run.json`` ({} when missing or unreadable)."""
    try:
        with open(os.path.join(path, RUN_META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def update_meta(path: str, **fields: Any) -> None:
    """Merge ``fields`` into a run folder's ``run.json`` (written atomically)."""
    os.makedirs(path, exist_ok=True)
    meta = {**read_meta(path), **fields}
    tmp = os.path.join(path, f".{RUN_META}.{uuid.uuid4().hex[:6]}")
    with open(tmp, "w") as f:
        json.dump(meta, f, sort_keys=True)
    os.replace(tmp, os.path.join(path, RUN_META))


class Segment:
    """This process's append-only log of buffered calls for one run."""

    def __init__(self, settings: BufferSettings, run_id: str, tracking_uri: str | None) -> None:
        self.dir = run_dir(settings.root, run_id)
        self.max_bytes = int(settings.max_mb * 2**20)
        self.tracking_uri = tracking_uri
        self.path: str | None = None
        self.written = 0
        self.dropped = 0
        self._seq = 0

    def _open(self) -> str:
        if self.path is None:
            update_meta(self.dir, tracking_uri=redact_url(self.tracking_uri or ""))
            name = f"{_SEGMENT_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            self.path = os.path.join(self.dir, name)
        return self.path

    def append(self, op: dict[str, Any]) -> bool:
        """Append one call (an artifact's file is copied in); return False when the buffer is full."""
        size = _size(op["file"]) if op.get("op") == "artifact" else 0
        if self.written + size > self.max_bytes:
            self.dropped += 1
            return False
        path = self._open()
        if op.get("op") == "artifact":
            rel = os.path.join("files", uuid.uuid4().hex[:12], os.path.basename(op["file"].rstrip("/")))
            copy = shutil.copytree if os.path.isdir(op["file"]) else shutil.copyfile
            os.makedirs(os.path.dirname(os.path.join(self.dir, rel)), exist_ok=True)
            copy(op["file"], os.path.join(self.dir, rel))
            op = {**op, "file": rel}
        self._seq += 1
        line = json.dumps({**op, "seq": self._seq, "t": time.time()}, default=str) + "\n"
        with open(path, "a") as f:  # one write per call: a killed process loses at most the call it was making
            f.write(line)
        self.written += len(line) + size
        return True

    def reset(self) -> None:
        """Start a new file at the next append (the old one was replayed and removed)."""
        self.path, self.written = None, 0


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def segments(path: str) -> list[str]:
    """Return the segment files of a run folder, sorted by name."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(os.path.join(path, n) for n in names if n.startswith(_SEGMENT_PREFIX) and n.endswith(".jsonl"))


def writer_alive(segment_path: str) -> bool:
    """Return True when the process that writes a segment may still be running (another host: assume so)."""
    host_pid = os.path.basename(segment_path)[len(_SEGMENT_PREFIX):].rsplit("-", 1)[0]
    host, _, pid = host_pid.rpartition("-")
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _sent(segment_path: str) -> int:
    try:
        with open(segment_path + ".sent") as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _remaining(segment_path: str) -> list[dict[str, Any]]:
    with open(segment_path) as f:
        lines = f.readlines()
    start = _sent(segment_path)
    ops = []
    for index, line in enumerate(lines[start:], start):
        with contextlib.suppress(ValueError):  # a line cut short by a kill: nothing to send
            ops.append({**json.loads(line), "_index": index, "_segment": segment_path})
    return ops


def pending_calls(path: str, only: list[str] | None = None) -> int:
    """Return how many buffered calls of a run folder (or of the ``only`` segments) are not sent yet."""
    return sum(len(_remaining(s)) for s in (only if only is not None else segments(path)) if os.path.exists(s))


@contextlib.contextmanager
def locked(path: str) -> Iterator[bool]:
    """Hold a run folder's replay lock; yield False (without waiting) when another process holds it."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _merged(ops: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Return the calls in groups: consecutive log_batch calls merged up to MLflow's limits, others alone."""
    groups: list[list[dict[str, Any]]] = []
    for op in ops:
        last = groups[-1] if groups else None
        if (op["op"] == "batch" and last and last[0]["op"] == "batch"
                and all(sum(len(o.get(k, [])) for o in last) + len(op.get(k, [])) <= n
                        for k, n in BATCH_LIMITS.items())):
            last.append(op)
        else:
            groups.append([op])
    return groups


def combine(group: list[dict[str, Any]]) -> dict[str, Any]:
    """Return one call for a group from :func:`_merged` (a merged log_batch, or the single call)."""
    if group[0]["op"] != "batch":
        return group[0]
    return {"op": "batch", **{k: [item for o in group for item in o.get(k, [])] for k in BATCH_LIMITS}}


def replay(path: str, send: Callable[[dict[str, Any], str], None], rejected: Callable[[dict[str, Any],
           Exception], bool], only: list[str] | None = None) -> int:
    """Send a run folder's buffered calls (or those of the ``only`` segments) in call order; return how many.

    ``send(call, folder)`` makes one call; when it raises, ``rejected(call, exc)`` says whether the
    server refused that call (it is skipped) rather than being down (:class:`Unreachable` is raised
    and the rest stays buffered). Sent calls are recorded as they go, so nothing is sent twice.
    """
    paths = [s for s in (only if only is not None else segments(path)) if os.path.exists(s)]
    # Each segment is in call order; across processes, calls interleave by their wall-clock time.
    ops = list(heapq.merge(*[_remaining(s) for s in paths], key=lambda o: (o.get("t", 0), o["_segment"])))
    count = 0
    for group in _merged(ops):
        call = combine(group)
        try:
            send(call, path)
        except Exception as exc:
            if not rejected(call, exc):
                raise Unreachable(str(exc)) from None
        for op in group:
            with open(op["_segment"] + ".sent", "w") as f:
                f.write(str(op["_index"] + 1))
            if op["op"] == "artifact":
                shutil.rmtree(os.path.dirname(os.path.join(path, op["file"])), ignore_errors=True)
        count += len(group)
    for seg in paths:
        for suffix in ("", ".sent"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(seg + suffix)
    return count


def forget_if_empty(path: str) -> bool:
    """Remove a run folder once no segment is left in it; return True when it is gone."""
    if segments(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def pending_runs(root: str) -> list[str]:
    """Return the run ids that have a folder under the buffer root."""
    try:
        return sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, RUN_META)))
    except OSError:
        return []


def handoff_out(path: str, store: Any, uri: str) -> int:
    """Move every segment (with its files) of a run folder to storage at ``uri``; return how many files moved.

    A Ray Train worker does this when its run ends while the server is down: the driver, possibly
    on another machine, takes them back with :func:`handoff_in`.
    """
    moved = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            if name in (RUN_META, ".lock") or name.startswith("."):
                continue
            local = os.path.join(dirpath, name)
            with open(local, "rb") as f:
                store.write_bytes(join(uri, os.path.relpath(local, path)), f.read())
            os.remove(local)
            moved += 1
    return moved


def handoff_in(store: Any, uri: str, path: str) -> int:
    """Move what :func:`handoff_out` left at ``uri`` into a local run folder; return how many files."""
    if not store.exists(uri):
        return 0
    loc = store.resolve(uri)
    base = ("s3://" + loc.path if uri.startswith("s3://") else loc.path).rstrip("/") + "/"
    files = store.list_files(uri)
    for file_uri in files:
        local = os.path.join(path, file_uri[len(base):])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(store.read_bytes(file_uri))
    store.delete(uri)
    return len(files)
