"""What a failed storage call means, in one line a user can act on.

Every backend raises its own exceptions (OSError subclasses from fsspec,
``HttpError`` from gcsfs, ``aiohttp``/``requests`` errors, google-auth
errors). :func:`storage_error_reason` names the ones we know; a backend turns
them into a :class:`PipelineError` with :func:`translate`. Errors it does not
know are left as they are, so that a bug is never disguised as an outage.
"""

from __future__ import annotations

import asyncio
import errno

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage.azure_errors import azure_reason, is_azure_error


class ChecksumMismatch(PipelineError):
    """A transferred file does not match the crc32c the server holds for it."""


def storage_error_reason(err: BaseException | None, permanent_only: bool = False) -> str | None:
    """A short reason for a remote storage error, or None when it is not one we know.

    ``permanent_only``: only errors that no retry can cure (403, 401, 400).
    """
    if err is None:
        return None
    text = str(err)
    first = text.splitlines()[0][:160] if text else type(err).__name__
    if isinstance(err, PermissionError) or (isinstance(err, OSError) and text.startswith("Forbidden")):
        return "permission denied (HTTP 403; check the credentials in storage_options or the environment)"
    if is_azure_error(err):
        return azure_reason(err, permanent_only)
    try:
        from gcsfs.retry import HttpError
    except ImportError:  # pragma: no cover - gcsfs not installed
        HttpError = ()
    if HttpError and isinstance(err, HttpError):
        code = getattr(err, "code", None)
        if code == 401:
            return "not authenticated (HTTP 401; check the credentials in storage_options or the environment)"
        if code in (408, 429) or (isinstance(code, int) and code >= 500):
            return None if permanent_only else f"storage unavailable after retries (HTTP {code})"
        message = str(getattr(err, "message", "") or "").splitlines()[0][:160] if getattr(err, "message", "") else ""
        return f"storage refused the request (HTTP {code}: {message})"
    if isinstance(err, ValueError) and text.startswith("Bad Request"):
        detail = text.splitlines()[1][:160] if len(text.splitlines()) > 1 else ""
        return f"storage refused the request (HTTP 400: {detail})"
    if permanent_only:
        return None
    try:
        import google.auth.exceptions as auth_exc

        if isinstance(err, auth_exc.DefaultCredentialsError):
            return "no credentials found (set token in storage_options or GOOGLE_APPLICATION_CREDENTIALS)"
        if isinstance(err, auth_exc.GoogleAuthError):
            return f"credentials rejected ({type(err).__name__})"
    except ImportError:  # pragma: no cover
        pass
    try:
        import aiohttp
        import requests

        if isinstance(err, requests.exceptions.ProxyError):
            return "storage unavailable after retries (HTTP 502)"
        if isinstance(err, (aiohttp.ClientError, requests.exceptions.RequestException)):
            return f"storage unreachable after retries ({type(err).__name__})"
    except ImportError:  # pragma: no cover
        pass
    if isinstance(err, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return f"storage unreachable after retries ({type(err).__name__})"
    if isinstance(err, ChecksumMismatch):
        return first
    return None


def translate(err: BaseException, action: str, where: str) -> PipelineError | None:
    """``err`` as a one-line PipelineError naming ``action`` and ``where``; None when unknown."""
    reason = storage_error_reason(err)
    if reason is None:
        return None
    return PipelineError(f"{reason} while {action}: {where}")


def is_precondition_failure(err: OSError) -> bool:
    """Whether a conditional write was refused because the object exists (HTTP 412 or EEXIST).

    fsspec backends report it in different shapes: an ``errno``, an HTTP
    ``code``, or only in the message.
    """
    code = getattr(err, "code", None) or getattr(err, "errno", None)
    return code in (412, errno.EEXIST) or "412" in str(err) or "precondition" in str(err).lower()
