"""One URI resolver for local paths and s3:// (AWS or any S3 endpoint: MinIO, Ceph, moto).

Everything in histodiff that touches files goes through here. URIs are strings: a local
path (relative or absolute, or ``file://``) or ``s3://bucket/key``. The endpoint and the
credentials come from :class:`~histodiff.config.StorageConfig` or, when unset there, from
the usual AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION``). Secrets never appear in
messages: every error raised here passes through :func:`redact`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow.fs as pafs

from histodiff.config import StorageConfig
# redact and redact_url are imported from here across histodiff: they stay importable from storage.
from histodiff.redaction import ENDPOINT_ENV_VARS, configured_keys, redact, redact_url, strip_userinfo  # noqa: F401


class StorageError(OSError):
    """A storage problem, with the URI and what to do; secrets already removed."""


def is_s3(uri: str) -> bool:
    """Return True for s3:// URIs."""
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Return ``uri/part/...`` for local paths and s3 URIs alike."""
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[5:].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def endpoint_url(cfg: StorageConfig | None = None) -> str | None:
    """Return the configured S3 endpoint (config first, then environment), or None for AWS."""
    if cfg is not None and cfg.endpoint_url:
        return cfg.endpoint_url
    for key in ENDPOINT_ENV_VARS:
        if os.environ.get(key):
            return os.environ[key]
    return None


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str


def s3_filesystem(cfg: StorageConfig | None = None, with_keys: bool = True) -> pafs.S3FileSystem:
    """Return a new pyarrow S3FileSystem for the configured endpoint and credentials.

    ``with_keys=False`` leaves credentials to the AWS default chain (the environment, an instance
    role): a filesystem built with keys carries them when pickled, so one that travels must not.
    Keys written into the endpoint (``http://KEY:SECRET@host``) count as configured keys.
    """
    cfg = cfg or StorageConfig()
    kwargs: dict[str, Any] = {
        "connect_timeout": cfg.connect_timeout_s,
        "request_timeout": cfg.request_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts),
    }
    endpoint = endpoint_url(cfg)
    if endpoint:
        scheme, _, host = strip_userinfo(endpoint).partition("://")
        kwargs["endpoint_override"] = host if host else endpoint
        kwargs["scheme"] = scheme if host else "https"
        kwargs["region"] = cfg.region or os.environ.get("AWS_REGION") or os.environ.get(
            "AWS_DEFAULT_REGION") or "us-east-1"
        kwargs["allow_bucket_creation"] = True
    elif cfg.region:
        kwargs["region"] = cfg.region
    keys = configured_keys(cfg, endpoint)
    if with_keys and keys is not None:
        kwargs["access_key"], kwargs["secret_key"] = keys
    return pafs.S3FileSystem(**kwargs)


def sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


_DENIED = ("access denied", "access_denied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden")


class Store:
    """Every file operation of histodiff, on local paths and s3:// URIs alike.

    One Store holds one set of storage settings (endpoint, region, credentials) and builds its
    S3 filesystem once, on first use; it travels to Ray workers by pickling (the filesystem is
    rebuilt there, lazily). Every error is a :class:`StorageError` with secrets redacted.
    """

    def __init__(self, cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg or StorageConfig()
        self._s3: pafs.S3FileSystem | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The endpoint (a setting) travels resolved: a worker's node may not have the driver's
        # AWS_ENDPOINT_URL_S3. Credentials do not, not even keys set in the config or written into
        # the endpoint: pickles reach Ray's object store and its spill files. Each node brings its own.
        cfg = self.cfg.model_copy(update={"endpoint_url": strip_userinfo(endpoint_url(self.cfg)),
                                          "access_key_id": None, "secret_access_key": None})
        return {"cfg": cfg, "_s3": None}

    def __repr__(self) -> str:
        return f"Store(endpoint={redact_url(endpoint_url(self.cfg) or 'AWS')!r})"

    def s3(self) -> pafs.S3FileSystem:
        """Return this store's S3 filesystem (built once)."""
        if self._s3 is None:
            self._s3 = s3_filesystem(self.cfg)
        return self._s3

    def s3_without_keys(self) -> pafs.S3FileSystem:
        """Return an S3 filesystem for this store's endpoint that takes credentials from each process's node."""
        return s3_filesystem(self.cfg, with_keys=False)

    def resolve(self, uri: str) -> Location:
        """Return the filesystem and in-filesystem path for a URI."""
        if not isinstance(uri, str) or not uri:
            raise StorageError(f"empty storage URI {uri!r}")
        if is_s3(uri):
            path = uri[5:].strip("/")
            if not path:
                raise StorageError(f"{uri!r} names no bucket")
            return Location(self.s3(), path, uri)
        if "://" in uri and not uri.startswith("file://"):
            raise StorageError(f"unsupported URI scheme in {redact_url(uri)!r}; use a local path or s3://bucket/key")
        path = os.path.abspath(uri[7:] if uri.startswith("file://") else uri)
        return Location(pafs.LocalFileSystem(), path, uri)

    def for_ray(self, uri: str) -> Location:
        """Return a URI's location with a filesystem that may be pickled to Ray processes (no keys inside)."""
        loc = self.resolve(uri)
        return Location(self.s3_without_keys(), loc.path, uri) if is_s3(uri) else loc

    def _wrap(self, exc: Exception, uri: str, action: str) -> StorageError:
        text = str(exc)
        hint = ""
        low = text.lower()
        if any(word in low for word in _DENIED):
            hint = " Check the S3 credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or storage.*)."
        elif "nosuchbucket" in low or "bucket does not exist" in low:
            hint = " The bucket does not exist."
        elif "connect" in low or "curl" in low or "timed out" in low or "timeout" in low:
            hint = f" The S3 endpoint {redact_url(endpoint_url(self.cfg) or 'AWS')} is unreachable; check " \
                   "storage.endpoint_url."
        return StorageError(redact(f"cannot {action} {uri!r}: {text}.{hint}", self.cfg))

    def exists(self, uri: str) -> bool:
        """Return True when a file or directory exists at the URI."""
        loc = self.resolve(uri)
        try:
            return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "look up") from None

    def check_readable(self, uri: str) -> None:
        """Raise a clear StorageError unless the URI exists and can be listed or read."""
        loc = self.resolve(uri)
        try:
            info = loc.fs.get_file_info(loc.path)
            if is_s3(uri) and info.type == pafs.FileType.NotFound:
                bucket = loc.path.split("/", 1)[0]
                if loc.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                    raise StorageError(f"bucket {bucket!r} of {uri!r} does not exist")
                # S3 "directories" exist only through their keys: look for one.
                sel = pafs.FileSelector(loc.path, recursive=False, allow_not_found=True)
                if loc.fs.get_file_info(sel):
                    return
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"{uri!r} does not exist")
        except StorageError:
            raise
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "read") from None

    def list_files(self, uri: str, extensions: Iterable[str] | None = None) -> list[str]:
        """Return the sorted URIs of all files under a prefix (recursively), filtered by suffix."""
        loc = self.resolve(uri)
        exts = tuple(e.lower() for e in extensions) if extensions else None
        try:
            info = loc.fs.get_file_info(loc.path)
            if info.type == pafs.FileType.File:
                infos = [info]
            else:
                infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "list") from None
        return sorted(("s3://" + item.path if is_s3(uri) else item.path) for item in infos
                      if item.type == pafs.FileType.File and (not exts or item.path.lower().endswith(exts)))

    def list_dirs(self, uri: str) -> list[str]:
        """Return the sorted names of the immediate subdirectories (S3: common prefixes) of a URI."""
        loc = self.resolve(uri)
        try:
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "list") from None
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)

    def read_bytes(self, uri: str) -> bytes:
        """Return the whole content of a file."""
        loc = self.resolve(uri)
        try:
            with loc.fs.open_input_stream(loc.path) as f:
                return f.read()
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "read") from None

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> Any:
        """Return one Parquet file as a ``pyarrow.Table`` (only ``columns`` when given)."""
        import pyarrow.parquet as pq

        loc = self.resolve(uri)
        try:
            return pq.read_table(loc.path, filesystem=loc.fs, columns=columns)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "read") from None

    def parquet_metadata(self, uri: str) -> Any:
        """Return the footer metadata of one Parquet file (row counts) without reading its data."""
        import pyarrow.parquet as pq

        loc = self.resolve(uri)
        try:
            return pq.read_metadata(loc.path, filesystem=loc.fs)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "read") from None

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a file atomically: a temporary name then a rename (local), one PUT (S3)."""
        loc = self.resolve(uri)
        try:
            if is_s3(uri):
                with loc.fs.open_output_stream(loc.path) as f:
                    f.write(data)
                return
            os.makedirs(os.path.dirname(loc.path), exist_ok=True)
            tmp = f"{loc.path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, loc.path)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "write") from None

    def read_json(self, uri: str) -> Any:
        """Return the parsed JSON document at the URI."""
        raw = self.read_bytes(uri)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri!r} is not valid JSON: {exc}") from None

    def write_json(self, uri: str, data: Any) -> None:
        """Write a JSON document atomically."""
        self.write_bytes(uri, json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def makedirs(self, uri: str) -> None:
        """Create a directory (a no-op on S3 beyond bucket creation)."""
        loc = self.resolve(uri)
        try:
            loc.fs.create_dir(loc.path, recursive=True)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "create") from None

    def delete(self, uri: str) -> None:
        """Delete a file or a directory tree if it exists."""
        loc = self.resolve(uri)
        try:
            info = loc.fs.get_file_info(loc.path)
            if info.type == pafs.FileType.Directory:
                loc.fs.delete_dir(loc.path)
            elif info.type == pafs.FileType.File:
                loc.fs.delete_file(loc.path)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "delete") from None

    def sha256_file(self, uri: str) -> str:
        """Return the hex sha256 of a file's content."""
        loc = self.resolve(uri)
        h = hashlib.sha256()
        try:
            with loc.fs.open_input_stream(loc.path) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "read") from None
        return h.hexdigest()

    def upload_dir(self, local_dir: str, uri: str) -> None:
        """Copy a local directory tree to a URI (no-op when they are the same place)."""
        dest = self.resolve(uri)
        if not is_s3(uri) and os.path.abspath(local_dir) == dest.path:
            return
        try:
            if not is_s3(uri):
                os.makedirs(dest.path, exist_ok=True)  # local copy_files does not create missing parents
            pafs.copy_files(local_dir, dest.path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=dest.fs)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "upload to") from None

    def download_dir(self, uri: str, local_dir: str) -> str:
        """Copy a directory tree at a URI to a local directory (local URIs: no copy); return the local path."""
        src = self.resolve(uri)
        if not is_s3(uri):
            return src.path
        os.makedirs(local_dir, exist_ok=True)
        try:
            pafs.copy_files(src.path, local_dir, source_filesystem=src.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "download") from None
        return local_dir

    def open_input(self, uri: str) -> io.BufferedIOBase:
        """Return a readable binary stream for the file at the URI."""
        loc = self.resolve(uri)
        try:
            return loc.fs.open_input_file(loc.path)
        except (OSError, ValueError) as exc:
            raise self._wrap(exc, uri, "open") from None
