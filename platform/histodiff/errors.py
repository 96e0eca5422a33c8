"""Errors a user can fix, and the one line the command prints for them.

Every user error (a bad override, an unknown stage, missing input data, an unreachable cluster
or endpoint) ends the command with exit code 2 and one line that names the input and the fix;
the traceback only with ``--verbose``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2

_DATA_HINT = ("run `histodiff demo` in this folder first (it writes the built-in tiles under outputs/builtin), "
              "or point paths.unlabeled_sources, paths.labeled_source and paths.labeled_test_source at your tiles")


class UserError(ValueError):
    """A mistake in what the user asked for; the message names the input and the fix."""


def user_message(exc: BaseException) -> str | None:
    """Return the one-line message for a user error, or None when ``exc`` is a bug (keep its traceback)."""
    from histodiff.config import ConfigError
    from histodiff.storage import StorageError

    if isinstance(exc, (UserError, ConfigError)):
        return _one_line(str(exc))
    if isinstance(exc, StorageError):
        text = _one_line(str(exc))
        if "does not exist" in text:
            return f"{text}; {_DATA_HINT if 'outputs/builtin' in text else 'check the paths.* settings'}"
        return text
    if isinstance(exc, FileNotFoundError) and exc.args and isinstance(exc.args[0], str) and " " in exc.args[0]:
        return _one_line(exc.args[0])  # the stages' own "no X at Y; run Z first" messages
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())
