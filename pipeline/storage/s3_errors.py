"""What a failed S3 request means: one table from S3's error codes to causes, in words a user can act on.

Example::

    from botocore.exceptions import ClientError
    from tf_export_pipeline.storage.s3_errors import s3_reason
    err = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    s3_reason(err, "my-bucket", "")  # -> 'storage throttled the requests after retries (SlowDown)'

botocore puts the server's error code and HTTP status on the exception's
``response``; s3fs turns the exception into an ``OSError`` and keeps the
botocore one as its cause, which :func:`client_error` finds. The code is
looked up first (:data:`ERROR_REASONS`), then the status; errors without an
answer (no credentials, a timeout, an unreachable endpoint) by their type. No
reason quotes the exception's text or a credential; an endpoint is shown as
``scheme://host:port`` only.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from tf_export_pipeline.storage.errors import ChecksumMismatch

CREDENTIALS_HINT = "check key and secret in storage_options or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"

#: S3 error code -> the cause.
ERROR_REASONS: dict[str, str] = {
    "AccessDenied": f"permission denied (HTTP 403 AccessDenied; {CREDENTIALS_HINT}, and the bucket policy)",
    "AllAccessDisabled": "permission denied (HTTP 403 AllAccessDisabled: access to the bucket is disabled)",
    "AccountProblem": "permission denied (HTTP 403 AccountProblem: the account cannot be used)",
    "InvalidAccessKeyId": f"credentials rejected (InvalidAccessKeyId: the server knows no such access key; "
                          f"{CREDENTIALS_HINT})",
    "SignatureDoesNotMatch": f"credentials rejected (SignatureDoesNotMatch: the secret does not belong to the "
                             f"access key; {CREDENTIALS_HINT})",
    "ExpiredToken": "credentials rejected (ExpiredToken: the session token has expired)",
    "InvalidToken": "credentials rejected (InvalidToken: the session token is malformed or invalid)",
    "TokenRefreshRequired": "credentials rejected (TokenRefreshRequired: the session token must be refreshed)",
    "RequestTimeTooSkewed": "credentials rejected (RequestTimeTooSkewed: this machine's clock is off)",
    "AuthorizationHeaderMalformed": "credentials rejected (AuthorizationHeaderMalformed: check region_name "
                                    "in client_kwargs)",
    "PermanentRedirect": "wrong endpoint or region for the bucket (PermanentRedirect; set region_name in "
                         "client_kwargs or endpoint_url)",
    "SlowDown": "storage throttled the requests after retries (SlowDown)",
    "Throttling": "storage throttled the requests after retries (Throttling)",
    "ThrottlingException": "storage throttled the requests after retries (ThrottlingException)",
    "RequestLimitExceeded": "storage throttled the requests after retries (RequestLimitExceeded)",
    "TooManyRequests": "storage throttled the requests after retries (HTTP 429)",
    "RequestTimeout": "storage timed out after retries (RequestTimeout)",
    "InternalError": "storage unavailable after retries (HTTP 500 InternalError)",
    "ServiceUnavailable": "storage unavailable after retries (HTTP 503 ServiceUnavailable)",
    "NotImplemented": "storage does not implement a request the pipeline needs (HTTP 501 NotImplemented)",
    "BadDigest": "upload corrupted in transit (BadDigest: the body does not match its checksum)",
    "InvalidDigest": "upload corrupted in transit (InvalidDigest)",
}


class Conflict(Exception):
    """HTTP 409 on a conditional request: another conditional write of the same key is in flight."""


def client_error(err: BaseException | None) -> tuple[str | None, int | None]:
    """S3's error code and HTTP status behind ``err`` (s3fs hides the botocore error as the cause)."""
    seen = 0
    while err is not None and seen < 5:
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            # An answer without a body (to HEAD) has only its status, which botocore puts in as the code.
            code = None if not code or str(code).isdigit() else str(code)
            return code, (int(status) if status else None)
        err = err.__cause__ or err.__context__
        seen += 1
    return None, None


def endpoint_shown(endpoint: str) -> str:
    """The endpoint as scheme://host:port (no user, path or query): safe in a message."""
    if not endpoint:
        return "the AWS default endpoint"
    parts = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def s3_reason(err: BaseException, bucket: str, endpoint: str) -> str | None:
    """The cause of a failed request to ``bucket`` at ``endpoint`` in a few words; None when it is not one
    we know."""
    if isinstance(err, ChecksumMismatch):
        return str(err).split(":")[0]
    code, status = client_error(err)
    if code == "NoSuchBucket":
        return f"bucket '{bucket}' does not exist"
    if code in ERROR_REASONS:
        return ERROR_REASONS[code]
    if status is not None:
        if status in (401, 403):
            return f"permission denied (HTTP {status}{' ' + code if code else ''}; {CREDENTIALS_HINT})"
        if status == 429:
            return ERROR_REASONS["TooManyRequests"]
        if status >= 500:
            return f"storage unavailable after retries (HTTP {status}{' ' + code if code else ''})"
        if code:
            return f"storage refused the request (HTTP {status} {code})"
    return _unanswered_reason(err, endpoint)


def _unanswered_reason(err: BaseException, endpoint: str) -> str | None:
    """The cause of a request that got no answer from the server (credentials, timeouts, connections)."""
    try:
        import botocore.exceptions as bex
    except ImportError:  # pragma: no cover - s3fs depends on botocore
        return None
    if isinstance(err, bex.NoCredentialsError):
        return "no credentials found (set key and secret in storage_options, or AWS_ACCESS_KEY_ID and " \
               "AWS_SECRET_ACCESS_KEY)"
    if isinstance(err, bex.PartialCredentialsError):
        return "incomplete credentials (a key without its secret, or the reverse)"
    if isinstance(err, (bex.ConnectTimeoutError, bex.ReadTimeoutError)) or \
            isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return f"storage timed out after retries ({type(err).__name__}, endpoint {endpoint_shown(endpoint)})"
    if isinstance(err, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.HTTPClientError,
                        ConnectionError)):
        return f"storage endpoint unreachable after retries ({endpoint_shown(endpoint)})"
    try:
        import aiohttp

        if isinstance(err, aiohttp.ClientError):
            return f"storage endpoint unreachable after retries ({endpoint_shown(endpoint)})"
    except ImportError:  # pragma: no cover
        pass
    return None

