"""pytest fixtures for tests against a real S3 server (SeaweedFS, see s3_server.py).

Example (a test module; the plugin is registered in tests/conftest.py)::

    def test_round_trip(s3_bucket):
        from tf_export_pipeline.storage import open_storage
        store = open_storage(s3_bucket.url("models"), s3_bucket.storage_options)
        assert store.create_only(store.join(store.root, "a"), b"x")

- ``s3_server`` (session; one per pytest-xdist worker): the running :class:`SeaweedS3`.
- ``s3_bucket`` (function): a fresh, empty bucket of it, as :class:`S3Bucket`
  (``.name``, ``.storage_options``, ``.url(...)``, ``.path(...)``, ``.objects(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from .s3_server import SeaweedS3


@dataclass(frozen=True)
class S3Bucket:
    name: str
    storage_options: dict
    server: SeaweedS3

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.name}", *(p.strip("/") for p in parts)]).rstrip("/")

    def path(self, *parts: str) -> str:
        """``<bucket>/<parts...>`` (s3fs's protocol-less form)."""
        return "/".join([self.name, *(p.strip("/") for p in parts)]).rstrip("/")

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts)

    @property
    def client(self):
        """The server's own botocore client: what a test reads back does not go through the pipeline."""
        return self.server.client()

    def objects(self, prefix: str = "") -> dict[str, dict]:
        """Objects under ``prefix/`` by key relative to it (ListObjectsV2)."""
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        return {k[len(prefix):]: o for k, o in self.server.list_objects(self.name, prefix).items()}

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture(scope="session")
def s3_server():
    server = SeaweedS3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    name = s3_server.create_bucket()
    yield S3Bucket(name, s3_server.storage_options(), s3_server)
    if s3_server.running:
        try:
            s3_server.delete_bucket(name)
        except Exception:  # noqa: BLE001 - the server and its data go at the end of the session
            pass
