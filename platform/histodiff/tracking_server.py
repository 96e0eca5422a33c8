"""Is the tracking server there, why a call failed, and keeping MLflow's HTTP retry noise quiet."""

from __future__ import annotations

import logging
from typing import Any

from histodiff.storage import redact


def scrub(value: Any) -> str:
    """Return ``str(value)`` with every secret found in the environment replaced by ``***``."""
    return redact(str(value))


class _QuietMlflowRetries(logging.Filter):
    """Drop urllib3's per-attempt retry warnings for MLflow requests: the tracker's one outage line says it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Return False for a retry warning about an MLflow API path."""
        message = record.getMessage()
        return not (message.startswith("Retrying") and "/api/2.0/mlflow" in message)


_QUIET = _QuietMlflowRetries()


def quiet_http_noise() -> None:
    """Install the retry filter on urllib3's connection-pool logger (once per process)."""
    logger = logging.getLogger("urllib3.connectionpool")
    if _QUIET not in logger.filters:
        logger.addFilter(_QUIET)


def reachable(uri: str | None, timeout: float = 5.0) -> bool:
    """Return True when a tracking server answers (any URI that is not http(s) counts as reachable)."""
    if not uri or not uri.startswith(("http://", "https://")):
        return True
    import requests

    try:  # any answer below 500 means a server is there; a proxy's 502/503 means MLflow behind it is not
        return requests.get(uri.rstrip("/") + "/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


def reason(exc: BaseException) -> str:
    """Return a short, secret-free reason for a failed tracking call."""
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Max retries exceeded", "no answer"), ("Name or service not known", "unknown host")):
        if needle in text:
            return short
    return scrub(text.splitlines()[0] if text else type(exc).__name__)[:200]
