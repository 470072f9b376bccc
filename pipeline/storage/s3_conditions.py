"""Whether an S3 server and this botocore keep the conditions create-only writes rest on.

Example::

    import fsspec
    from tf_export_pipeline.storage.s3_conditions import check_parameters, probe_create_only
    fs = fsspec.filesystem("s3", endpoint_url="http://127.0.0.1:8333", key="...", secret="...")
    check_parameters(fs.s3.meta.service_model, "s3://bucket/m")  # raises when botocore would drop one
    fsspec.asyn.sync(fs.loop, probe_create_only, fs, "http://127.0.0.1:8333", "bucket/m/_exports/claims")

Two things can turn a conditional request into a plain one without a word:

- s3fs drops any keyword its botocore does not know; :func:`check_parameters`
  refuses a botocore whose model lacks one of :data:`CONDITIONAL_PARAMETERS`;
- a server may accept ``If-None-Match: *`` and ignore it;
  :func:`probe_create_only` makes two create-only writes of one fresh key
  (a dot-file, which no reader of claims or the ledger takes for an entry) and
  requires the second to be refused, once per endpoint and bucket and process.
"""

from __future__ import annotations

import posixpath
import secrets
from typing import Any

from tf_export_pipeline.errors import PipelineError
from tf_export_pipeline.storage.bucket import split
from tf_export_pipeline.storage.s3_errors import Conflict
from tf_export_pipeline.storage.s3_objects import put_object

PROBE_PREFIX = ".create-only-probe-"
#: The request parameters the guarantees rest on, by S3 operation.
CONDITIONAL_PARAMETERS = {"PutObject": ("IfNoneMatch", "IfMatch"), "CopyObject": ("IfNoneMatch",),
                          "DeleteObject": ("IfMatch",), "CompleteMultipartUpload": ("IfNoneMatch",)}

# (endpoint, bucket) pairs whose create-only writes were probed and held, per process.
_HONOURED: set[tuple[str, str]] = set()


def check_parameters(service_model: Any, where: str) -> None:
    """Refuse (PipelineError naming ``where``) a botocore that would silently drop the conditions."""
    for operation, names in CONDITIONAL_PARAMETERS.items():
        members = service_model.operation_model(operation).input_shape.members
        missing = [n for n in names if n not in members]
        if missing:
            import botocore

            raise PipelineError(f"botocore {botocore.__version__} cannot send {operation} {missing[0]}, which "
                                f"create-only writes need (upgrade botocore and aiobotocore): {where}")


def create_only_known(endpoint: str, bucket: str) -> bool:
    """Whether a probe in this process has shown ``bucket`` at ``endpoint`` to keep create-only writes."""
    return (endpoint, bucket) in _HONOURED


async def probe_create_only(fs: Any, endpoint: str, directory: str) -> bool:
    """Two create-only writes of one fresh key in ``directory`` (``bucket/prefix``); whether the second was
    refused. A bucket that refused it is remembered for :func:`create_only_known`; the probe object is
    removed after."""
    probe = posixpath.join(directory, PROBE_PREFIX + secrets.token_hex(8))
    bucket, key = split(probe)
    await put_object(fs, probe, b"probe", None, IfNoneMatch="*")
    try:
        await put_object(fs, probe, b"probe", None, IfNoneMatch="*")
        honoured = False
    except (FileExistsError, Conflict):  # a 409 is the condition enforced too
        honoured = True
    finally:
        try:
            await fs._call_s3("delete_object", Bucket=bucket, Key=key)
        except Exception:  # noqa: BLE001 - a probe left behind is a dot-file no reader lists
            pass
    if honoured:
        _HONOURED.add((endpoint, bucket))
    return honoured
