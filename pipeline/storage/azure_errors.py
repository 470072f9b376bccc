"""What a failed Azure Blob Storage request means: one table from the service's error codes to causes.

Example::

    from azure.core.exceptions import HttpResponseError
    from tf_export_pipeline.storage.azure_errors import azure_reason
    err = HttpResponseError(message="The specified container does not exist.")
    err.error_code, err.status_code = "ContainerNotFound", 404
    azure_reason(err)  # -> 'container does not exist (ContainerNotFound)'

The service names every failure with an ``x-ms-error-code`` (``ErrorCode`` in
the body); azure-storage-blob puts it on the exception as ``error_code``.
Codes that no retry cures are *permanent*; the rest (throttling, 5xx,
timeouts, an unreachable endpoint) have already been retried by the client's
retry policy when they reach us. Only the code and the status are used, never
the exception's text: that text can carry the request's signature, and a
request URL its SAS token.
"""

from __future__ import annotations

#: error code -> (cause, permanent)
ERROR_CODES: dict[str, tuple[str, bool]] = {
    "ContainerNotFound": ("container does not exist", True),
    "ContainerBeingDeleted": ("container is being deleted", True),
    "ContainerDisabled": ("container is disabled", True),
    "AccountIsDisabled": ("storage account is disabled", True),
    "AuthenticationFailed": ("authentication failed (check account_key, sas_token or connection_string in "
                             "storage_options, or the AZURE_STORAGE_* variables)", True),
    "AuthorizationFailure": ("not authorized (a wrong key or SAS, or a credential that may not do this "
                             "operation)", True),
    "AuthorizationPermissionMismatch": ("not authorized (the credential lacks the permission for this "
                                        "operation)", True),
    "AuthorizationSourceIPMismatch": ("not authorized from this address (account firewall or SAS IP range)", True),
    "AuthorizationProtocolMismatch": ("not authorized over this protocol (the SAS requires https)", True),
    "AuthorizationResourceTypeMismatch": ("not authorized (the SAS does not cover this resource type)", True),
    "AuthorizationServiceMismatch": ("not authorized (the SAS does not cover the Blob service)", True),
    "InsufficientAccountPermissions": ("not authorized (the account lacks a permission this operation needs)", True),
    "KeyVaultEncryptionKeyNotFound": ("not authorized (the account's encryption key is unavailable)", True),
    "InvalidResourceName": ("invalid container or blob name", True),
    "OutOfRangeInput": ("a name or parameter is out of range (container names have 3-63 characters)", True),
    "InvalidUri": ("invalid request URL (check the container and blob names)", True),
    "InvalidAuthenticationInfo": ("invalid authentication information (a malformed key or SAS)", True),
    "InvalidQueryParameterValue": ("invalid query parameter (a malformed SAS token?)", True),
    "UnsupportedHeader": ("the endpoint does not support a header this operation needs", True),
    "RequestBodyTooLarge": ("request body too large", True),
    "Md5Mismatch": ("upload corrupted in transit (the server's MD5 of the body differs)", False),
    "ServerBusy": ("storage busy (throttled) after retries", False),
    "OperationTimedOut": ("storage timed out after retries", False),
    "InternalError": ("storage internal error after retries", False),
}


def error_code(err: BaseException) -> str | None:
    code = getattr(err, "error_code", None)
    return str(getattr(code, "value", code)) if code else None


def is_azure_error(err: BaseException) -> bool:
    return type(err).__module__.startswith(("azure.core", "azure.storage", "azure.identity"))


def azure_reason(err: BaseException | None, permanent_only: bool = False) -> str | None:
    """A short cause for an Azure SDK error, or None when it is not one (or, with ``permanent_only``, a
    retry could still cure it)."""
    if err is None or not is_azure_error(err):
        return None
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )

    code = error_code(err)
    status = getattr(err, "status_code", None)
    if code in ERROR_CODES:
        cause, permanent = ERROR_CODES[code]
        if permanent_only and not permanent:
            return None
        return f"{cause} ({code})"
    if isinstance(err, ClientAuthenticationError) and status is None:
        # azure-identity found no credential, or its token request failed
        return f"no usable credentials ({type(err).__name__}; set account_key, sas_token or connection_string)"
    if isinstance(err, HttpResponseError) and status is not None:
        label = f"HTTP {status}" + (f" {code}" if code else "")
        if status in (401, 403):
            return f"not authorized ({label}; check the credentials in storage_options or the environment)"
        if status in (408, 429) or status >= 500:
            return None if permanent_only else f"storage unavailable after retries ({label})"
        if 400 <= status < 500:
            return f"storage refused the request ({label})"
    if permanent_only:
        return None
    if isinstance(err, ServiceRequestError):
        return f"storage unreachable after retries ({type(err).__name__}: the endpoint did not accept a connection)"
    if isinstance(err, ServiceResponseError):
        return f"no answer from storage after retries ({type(err).__name__}: connection dropped or timed out)"
    return None


def is_transient(err: BaseException) -> bool:
    """Whether another attempt may succeed (throttling, 5xx, a lost connection)."""
    return azure_reason(err) is not None and azure_reason(err, permanent_only=True) is None
