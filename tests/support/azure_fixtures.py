"""pytest fixtures for tests against Azurite, Azure Storage's emulator.

Example (a test module; the plugin is registered in tests/conftest.py)::

    def test_something(azure_container):
        store = open_storage(azure_container.url("base"), azure_container.storage_options)

- ``azurite`` (session): the running :class:`~tests.support.azurite.Azurite`,
  shared by every test of the session; skipped when Azurite is not installed.
- ``azure_container`` (function): a fresh, empty container of its own, as
  :class:`AzureContainer` (``.name``, ``.storage_options``, ``.url(...)``,
  and ``.client``, an azure-storage-blob ContainerClient for reading back
  without the pipeline's storage layer); deleted after the test.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from .azurite import Azurite, AzuriteError


@dataclass(frozen=True)
class AzureContainer:
    name: str
    connection_string: str
    server: Azurite
    client: Any  # azure.storage.blob.ContainerClient

    @property
    def storage_options(self) -> dict:
        return {"connection_string": self.connection_string}

    def url(self, *parts: str, scheme: str = "az") -> str:
        """``az://<container>/<parts...>``."""
        return "/".join([f"{scheme}://{self.name}", *(p.strip("/") for p in parts)]).rstrip("/")

    def blobs(self, prefix: str = "") -> dict[str, Any]:
        """Blob properties by name relative to ``prefix/``, from the service's own listing."""
        head = prefix.strip("/") + "/" if prefix else ""
        return {b.name[len(head):]: b for b in self.client.list_blobs(name_starts_with=head or None,
                                                                        include=["metadata"])}


@pytest.fixture(scope="session")
def azurite():
    try:
        server = Azurite().start()
    except AzuriteError as err:
        pytest.skip(str(err))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def azure_container(azurite):
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    name = f"t{uuid.uuid4().hex[:20]}"
    client = service.create_container(name)
    try:
        yield AzureContainer(name, azurite.connection_string, azurite, client)
    finally:
        if azurite.running:
            try:
                client.delete_container()
            except Exception:
                pass  # the server's data goes with its temporary directory anyway
        service.close()
