"""Secrets out of every output: errors, tracebacks, logs, events and XComs.

Example::

    from tf_export_pipeline.redaction import redact, register_options
    register_options({"token": {"type": "service_account", "private_key_id": "0a1b2c3d4e5f"},
                      "project": "my-project"})
    redact("refresh failed for key 0a1b2c3d4e5f in my-project")
    # -> 'refresh failed for key *** in my-project'
    redact("GET /tokeninfo?access_token=ya29.a0Af-example failed")
    # -> 'GET /tokeninfo?access_token=*** failed'

Two kinds of redaction, both replacing with ``***``:

Registered secrets
    Every string value, at any depth, of the ``storage_options`` of a loaded
    config (:func:`tf_export_pipeline.config.config_from_dict` registers them) and of
    the fields and extras of an Airflow connection turned into storage options
    (``tf_export_pipeline.operators.connections``). Registration is process-wide and only grows:
    a secret seen once stays redacted for the life of the process.

    What is not registered (values that name, not prove, who is calling; or
    say where, not how):

    - values of the keys in :data:`HARMLESS_KEYS`: ``project``, ``project_id``,
      ``endpoint_url``, ``region_name``, ``client_email``, ``client_id``,
      ``type``, ``token_uri``, ``key_path`` and a few more (a URL's password
      or token query is still caught by the patterns below);
    - a ``token`` that is one of gcsfs's keywords (``anon``, ``google_default``,
      ...) or the path of an existing file (the key is in the file, and a path
      in an error message is what lets a user fix it);
    - values shorter than :data:`MIN_SECRET_LENGTH` characters and literals
      such as ``true``: masking short common strings would garble paths in the
      records one Airflow task hands to the next, for no real protection.

    Each secret is also matched as it appears JSON-escaped, ``repr``-escaped
    and URL-encoded, and a multi-line one (a PEM key) line by line.

Patterns, whoever's the secret
    ``access_token=``, ``token=``, ``client_secret=``, ``password=``... and, in
    a query string, ``key=``, ``sig=``, ``X-Goog-Signature=``...; a
    ``"private_key": "..."`` (or ``token``, ``password``, ``secret``...) field
    of a dict or JSON text; ``Authorization: ...`` and ``Bearer ...``; PEM
    blocks (``-----BEGIN ...-----`` to ``-----END ...-----``, or to the end of
    a truncated one); the password of ``scheme://user:password@host``; Google
    OAuth access (``ya29.``) and refresh (``1//``) tokens and client secrets
    (``GOCSPX-``).

:func:`install` puts :class:`RedactingFilter` on the root logger, its handlers
and logging's last-resort handler, and redacts printed warnings.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_SECRET_LENGTH = 6

# gcsfs's ``token`` keywords: they choose a way to authenticate, they are not a credential.
GCS_TOKEN_KEYWORDS = ("google_default", "cache", "anon", "browser", "cloud")

# Keys (compared lower-case, '-' as '_', after an ``extra__<type>__`` or ``gcs.`` prefix) whose values are not secret.
HARMLESS_KEYS = frozenset({
    "project", "project_id", "quota_project_id", "endpoint_url", "endpoint", "region_name", "region",
    "location", "default_location", "consistency", "cache_timeout", "requester_pays", "use_listings_cache",
    "listings_expiry_time", "version_aware", "timeout", "block_size", "anonymous", "anon", "trust_env",
    "type", "universe_domain", "token_uri", "auth_uri", "auth_provider_x509_cert_url", "client_x509_cert_url",
    "client_email", "client_id", "key_path", "conn_id", "conn_type", "host", "schema", "port", "description",
})
_NOT_SECRETS = frozenset({"true", "false", "none", "null", "yes", "no", "on", "off", *GCS_TOKEN_KEYWORDS})

# Names whose value is a credential wherever ``name=value`` or ``"name": "value"`` appears.
_SECRET_NAMES = (r"access_token|refresh_token|id_token|client_secret|private_key_id|private_key|"
                 r"aws_secret_access_key|secret_access_key|aws_session_token|session_token|"
                 r"password|passwd|secret|api_key|apikey|token|credentials?")
# Names that are a credential only as a URL query parameter (``?key=...``): elsewhere they are too common a word.
_QUERY_NAMES = (r"key|sig|signature|code|sas|x-goog-signature|x-goog-credential|x-goog-security-token|"
                r"x-amz-signature|x-amz-credential|x-amz-security-token")

_PATTERNS: tuple[tuple[re.Pattern, str], ...] = (
    # PEM blocks, whole (JSON-escaped newlines included) or cut short by a truncated message.
    (re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S), MASK),
    (re.compile(r"-----BEGIN [A-Z0-9 ]+-----[A-Za-z0-9+/=\s\\]*"), MASK),
    # "private_key": "...", 'token': '...', password="..." in dicts, JSON and keyword arguments.
    (re.compile(rf"""(?i)(?<![\w-])(["']?)({_SECRET_NAMES})\1(\s*[:=]\s*)(["'])(?:\\.|(?!\4).)*\4"""),
     rf"\1\2\1\3\4{MASK}\4"),
    # Query strings and name=value text: ?access_token=..., token=... (not a line of code such as
    # ``token=info["token"]`` in a traceback: a value followed by ``[`` or ``(`` is an expression).
    # ``(?=(?P<v>...))(?P=v)`` takes the whole value or nothing (what ``++`` does from Python 3.11 on).
    (re.compile(rf"(?i)(?<![\w-])({_SECRET_NAMES})=(?=(?P<v>[^&\s'\",;()\[\]{{}}#]+))(?P=v)(?![(\[])"),
     rf"\1={MASK}"),
    (re.compile(rf"(?i)([?&;](?:{_QUERY_NAMES}))=(?=(?P<v>[^&\s'\",;()\[\]{{}}#]+))(?P=v)(?![(\[])"),
     rf"\1={MASK}"),
    # Authorization headers, as text or as a dict's item; bare bearer tokens.
    (re.compile(r"""(?i)(authorization["']?\s*[:=]\s*["']?)((?:bearer|basic|token|digest|negotiate)\s+)?"""
                r"""[^\s"',}\]]+"""), rf"\1\2{MASK}"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]{8,}=*"), rf"\1 {MASK}"),
    # scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@'\"]*):[^/\s@'\"]+@"), rf"\1:{MASK}@"),
    # Google OAuth access tokens, refresh tokens and client secrets, by their shape.
    (re.compile(r"\bya29\.[A-Za-z0-9_\-.]+"), MASK),
    (re.compile(r"(?<![\w/])1//0[A-Za-z0-9_\-]{20,}"), MASK),
    (re.compile(r"\bGOCSPX-[A-Za-z0-9_\-]{10,}"), MASK),
)


def _norm_key(key: Any) -> str:
    name = str(key).lower().replace("-", "_")
    if name.startswith("extra__") and "__" in name[len("extra__"):]:
        name = name.rsplit("__", 1)[1]
    if name.startswith("gcs."):
        name = name[len("gcs."):]
    return name


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(os.path.expanduser(path))
    except (OSError, ValueError):
        return False


def secrets_in(value: Any, key: str | None = None) -> set[str]:
    """The secret strings of ``value`` (storage options, a connection's extras...), by the rules above."""
    found: set[str] = set()
    name = _norm_key(key) if key is not None else None
    if name in HARMLESS_KEYS:
        return found
    if isinstance(value, dict):
        for k, v in value.items():
            found |= secrets_in(v, k)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            found |= secrets_in(v, key)
    elif isinstance(value, (bytes, bytearray)):
        found |= secrets_in(bytes(value).decode("utf-8", "replace"), key)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) < MIN_SECRET_LENGTH or text.lower() in _NOT_SECRETS:
            return found
        if name == "token" and _is_file(text):
            return found
        if text.startswith("{"):  # a JSON object given as a string (a keyfile_dict): its values, and itself
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                found |= secrets_in(parsed)
        found.add(value)
    return found


def _variants(secret: str) -> set[str]:
    out = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], quote(secret, safe=""), quote_plus(secret)}
    if "\n" in secret:  # a PEM key: any one of its lines may be quoted alone
        out |= {line.strip() for line in secret.splitlines() if len(line.strip()) >= 16}
    return {v for v in out if len(v) >= MIN_SECRET_LENGTH}


class Redactor:
    """Known secrets plus the patterns; ``redact(text)`` masks both."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._regex: re.Pattern | None = None
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []

    def register(self, *values: Any) -> None:
        """Treat every secret in ``values`` (strings, dicts, lists, as :func:`secrets_in`) as secret."""
        new: set[str] = set()
        for value in values:
            new |= secrets_in(value)
        self.register_exact(new)

    def register_exact(self, secrets: Iterable[str]) -> None:
        """Treat each of ``secrets`` as secret, as it is (no key rules)."""
        added: list[str] = []
        with self._lock:
            for secret in secrets:
                if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH or secret in self._secrets:
                    continue
                self._secrets.add(secret)
                added.append(secret)
            if added:
                variants = set().union(*(_variants(s) for s in self._secrets))
                # Longest first, so a secret that contains another is masked whole.
                alternatives = sorted(variants, key=len, reverse=True)
                self._regex = re.compile("|".join(re.escape(v) for v in alternatives))
            listeners = list(self._listeners)
        for secret in added:
            for listener in listeners:
                _call_quietly(listener, secret)

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(secret)`` for every secret registered, now and later (e.g. Airflow's masker)."""
        with self._lock:
            if listener in self._listeners:
                return
            self._listeners.append(listener)
            known = list(self._secrets)
        for secret in known:
            _call_quietly(listener, secret)

    def redact(self, text: Any) -> str:
        text = text if isinstance(text, str) else str(text)
        regex = self._regex
        if regex is not None:
            text = regex.sub(MASK, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def redact_value(self, value: Any) -> Any:
        """``value`` with every string in it (dict values, list items) redacted; other types as they are."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact_value(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self.redact_value(v) for v in value)
        return value

    def clear(self) -> None:
        """Forget the registered secrets (tests only: a process never needs to)."""
        with self._lock:
            self._secrets.clear()
            self._regex = None


def _call_quietly(listener: Callable[[str], None], secret: str) -> None:
    try:
        listener(secret)
    except Exception:  # noqa: BLE001 - a masker that fails must not stop the pipeline; our own redaction holds
        pass


REDACTOR = Redactor()


def register(*values: Any) -> None:
    """Register the secrets in ``values`` process-wide."""
    REDACTOR.register(*values)


def register_options(options: Any) -> None:
    """Register the secrets of a ``storage_options`` mapping process-wide."""
    if options:
        REDACTOR.register(options)


def redact(text: Any) -> str:
    """``text`` (or ``str(text)``) with every known secret and secret-looking value replaced by ``***``."""
    return REDACTOR.redact(text)


def redact_value(value: Any) -> Any:
    return REDACTOR.redact_value(value)


def format_exception(err: BaseException) -> str:
    """The traceback of ``err`` (with its causes), redacted."""
    return redact("".join(traceback.format_exception(type(err), err, err.__traceback__)))


class RedactedError(Exception):
    """Stands in for an error whose message or traceback held a secret; says the original type and message."""


def scrub_exception(err: BaseException) -> BaseException:
    """``err`` itself when neither it nor its causes show a secret; else an error of the same meaning without it.

    The stand-in is of ``err``'s own class when that takes its message as its
    one argument (the pipeline's errors, Airflow's, most built-in ones), so
    exit codes, retries and skips still work; a :class:`RedactedError` naming
    the class otherwise. It carries the redacted original traceback as a
    note, and no cause or context (those would print the secret).
    """
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    clean = redact(text)
    if clean == text:
        return err
    message = redact(str(err))
    safe: BaseException | None = None
    if len(err.args) == 1 and isinstance(err.args[0], str):
        try:
            candidate = type(err)(message)
            if str(candidate) == message:
                safe = candidate
        except Exception:  # noqa: BLE001 - a class with another signature: the stand-in below
            safe = None
    if safe is None:
        safe = RedactedError(f"{type(err).__name__}: {message}")
    if hasattr(safe, "add_note"):  # Python 3.11+; before, the stand-in says only what it replaces
        safe.add_note("original error, redacted:\n" + clean.rstrip())
    safe.__cause__ = None
    safe.__context__ = None
    safe.__suppress_context__ = True
    return safe


class RedactingFilter(logging.Filter):
    """Redacts a record in place: its message (formatted with its args), its traceback and stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: keep what can be shown
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            safe = scrub_exception(err)
            if safe is not err:
                # Whatever formats the record (logging's Formatter, structlog's) renders the stand-in.
                record.exc_info, record.exc_text = (type(safe), safe, None), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def install(logger: logging.Logger | None = None) -> RedactingFilter:
    """Redact what ``logger`` (default: the root logger) and its handlers emit, and printed warnings.

    A filter on a logger sees only the records logged on that logger itself;
    one on a handler sees every record that propagates to it. So the filter
    goes on both, and on logging's last-resort handler (what prints a warning
    when no handler is configured). Call again after handlers change; it is
    idempotent.
    """
    target = logger if logger is not None else logging.getLogger()
    for holder in (target, *target.handlers, logging.lastResort):
        if holder is not None and _FILTER not in holder.filters:
            holder.addFilter(_FILTER)
    _redact_warnings()
    return _FILTER


def _redact_warnings() -> None:
    import warnings

    if getattr(warnings.formatwarning, "_redacting", False):
        return
    original = warnings.formatwarning

    def formatwarning(*args: Any, **kwargs: Any) -> str:
        return redact(original(*args, **kwargs))

    formatwarning._redacting = True  # type: ignore[attr-defined]
    warnings.formatwarning = formatwarning
