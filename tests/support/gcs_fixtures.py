"""pytest fixtures for tests against a real GCS emulator (``fake-gcs-server``).

Use them from a test module with
``from tests.support.gcs_fixtures import gcs_server, gcs_bucket  # noqa: F401``
or from a conftest with ``pytest_plugins = ["tests.support.gcs_fixtures"]``.

- ``gcs_server`` (session): the running :class:`GcsEmulator`.
- ``gcs_bucket`` (function): a fresh, empty bucket, as :class:`GcsBucket`
  (``.name``, ``.storage_options``, ``.url(...)``, ``.fs()``).
- ``gcs_fault_proxy`` (function): a :class:`FaultProxy` in front of the
  emulator, injecting nothing until configured; ``bucket.via(proxy)`` gives a
  view of the bucket whose storage_options go through it.
- ``fast_gcs_retries`` (function): gcsfs's retry back-off (1-2 s, 2-3 s, ...)
  shrunk a hundredfold, so fault tests stay fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass

import pytest

from .fault_proxy import FaultProxy
from .gcs_emulator import (
    GcsEmulator,
    clear_gcsfs_caches,
    ensure_plain_gcsfs,
    make_fs,
    storage_options,
)


@dataclass(frozen=True)
class GcsBucket:
    name: str
    storage_options: dict
    server: GcsEmulator

    @property
    def endpoint(self) -> str:
        return self.storage_options["endpoint_url"]

    def url(self, *parts: str) -> str:
        """``gs://<bucket>/<parts...>``."""
        return "/".join([f"gs://{self.name}", *(p.strip("/") for p in parts)]).rstrip("/")

    def path(self, *parts: str) -> str:
        """``<bucket>/<parts...>`` (gcsfs's protocol-less form)."""
        return "/".join([self.name, *(p.strip("/") for p in parts)]).rstrip("/")

    def fs(self, fresh: bool = True):
        """A gcsfs filesystem for this bucket (a new instance unless ``fresh=False``)."""
        return make_fs(self.storage_options, fresh=fresh)

    def via(self, proxy: FaultProxy) -> GcsBucket:
        """The same bucket reached through ``proxy``."""
        opts = dict(self.storage_options, endpoint_url=proxy.url)
        return dataclasses.replace(self, storage_options=opts)


@pytest.fixture(scope="session")
def gcs_server():
    ensure_plain_gcsfs()
    server = GcsEmulator(backend="memory")
    server.start()
    try:
        yield server
    finally:
        clear_gcsfs_caches()
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    ensure_plain_gcsfs()
    clear_gcsfs_caches()
    name = gcs_server.create_bucket()
    yield GcsBucket(name, storage_options(gcs_server.url), gcs_server)
    clear_gcsfs_caches()
    if gcs_server.running:
        try:
            gcs_server.delete_bucket(name)
        except Exception:
            pass  # the emulator is in memory and per session: nothing leaks


@pytest.fixture
def gcs_fault_proxy(gcs_server):
    proxy = FaultProxy(gcs_server.url, lifetime=60.0)
    proxy.start()
    try:
        yield proxy
    finally:
        clear_gcsfs_caches()  # drop sessions pooled on the proxy's port
        proxy.stop()


class _FastSleepAsyncio:
    """Stands in for the ``asyncio`` module inside ``gcsfs.retry`` only."""

    def __init__(self, factor: float):
        self.factor = factor
        self.delays: list[float] = []

    async def sleep(self, delay, *args, **kwargs):
        self.delays.append(delay)
        return await asyncio.sleep(delay * self.factor, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(asyncio, name)


@pytest.fixture
def fast_gcs_retries(monkeypatch):
    """Shrink gcsfs's retry back-off; ``.delays`` records the requested sleeps."""
    import gcsfs.retry

    fast = _FastSleepAsyncio(0.01)
    monkeypatch.setattr(gcsfs.retry, "asyncio", fast)
    return fast
