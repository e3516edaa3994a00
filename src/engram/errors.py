"""The one error base class of engram-lm.

Every error that bad input can cause (a wrong config value, a corrupt file, a checkpoint from
another tokenizer, ...) is an ``EngramError``. It subclasses ``ValueError`` so code that already
catches ``ValueError`` keeps working. The command line prints an ``EngramError`` as one line
``engram: error: ...`` (exit 2, no traceback) and the inspect server answers it with a 4xx status
chosen by type (``http_status``), never by the wording of the message. Anything else that escapes
is a bug and keeps its traceback.

This module imports nothing from the package, so every layer may use it.
"""

from __future__ import annotations


class EngramError(ValueError):
    """Bad input: the message names the value and the fix.

    ``http_status`` is the status a server answers with when a request causes this error:
    400 (the request is wrong) unless a subclass says otherwise.
    """

    http_status: int = 400


class NotFoundError(EngramError, FileNotFoundError):
    """A file, run directory or resource named by the user does not exist."""

    http_status = 404


class ConfigError(EngramError):
    """A configuration value is invalid; the message names the value and the fix."""


class RequestTooLargeError(EngramError):
    """The input is larger than a limit allows, e.g. more tokens than the model's max_seq_len."""

    http_status = 413
