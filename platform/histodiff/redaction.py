"""Secrets: the storage keys a config sets, and keeping every secret out of messages.

Imported by storage, tracking and the Ray start-up without pulling in pyarrow or MLflow.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_PASSWORD")
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")


def _secret_values(cfg: Any = None) -> list[str]:
    values = [os.environ.get(k, "") for k in SECRET_ENV_VARS]
    endpoints = [os.environ.get(k, "") for k in ENDPOINT_ENV_VARS]
    if cfg is not None:
        endpoints.append(cfg.endpoint_url or "")
        for secret in (cfg.access_key_id, cfg.secret_access_key):
            if secret is not None:
                values.append(secret.get_secret_value())
    for url in endpoints:  # http://KEY:SECRET@host: the parts, wherever they appear on their own
        values += [unquote(part) for part in userinfo(url)]
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def userinfo(url: str) -> tuple[str, ...]:
    """Return the (user, password) parts of a URL's ``user:password@``, or ()."""
    match = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://([^/@\s]+)@", url or "")
    return tuple(match.group(1).split(":", 1)) if match else ()


def strip_userinfo(url: str | None) -> str | None:
    """Return a URL without its ``user:password@`` part (what may travel to workers and into logs)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "", url) if url else url


def redact(text: str, cfg: Any = None) -> str:
    """Return text with every known secret value replaced by ``***``."""
    for value in _secret_values(cfg):
        text = text.replace(value, "***")
    return redact_url(text)


def redact_url(url: str) -> str:
    """Return a URL with any ``user:password@`` part replaced by ``***@``."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", url)




def configured_keys(cfg: Any, endpoint: str | None = None) -> tuple[str, str] | None:
    """Return the (access key, secret key) a StorageConfig sets or its endpoint carries; None: the AWS chain."""
    if cfg is not None and cfg.access_key_id is not None and cfg.secret_access_key is not None:
        return cfg.access_key_id.get_secret_value(), cfg.secret_access_key.get_secret_value()
    parts = userinfo(endpoint or (cfg.endpoint_url if cfg is not None else "") or "")
    return (unquote(parts[0]), unquote(parts[1])) if len(parts) == 2 else None
