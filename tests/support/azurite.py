"""Run Azurite's Blob service (Azure Storage's emulator, from npm) on loopback for the Azure tests.

Example::

    from tests.support.azurite import Azurite
    with Azurite() as server:
        print(server.connection_string)   # devstoreaccount1 at http://127.0.0.1:<port>/devstoreaccount1

``deploy/install_azurite.sh`` (run by ``make test``) puts the binary in
``.tools/azurite``; ``AZURITE_BLOB_BIN`` names another one. The server keeps
its data in a temporary directory of its own, removed when it stops.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".tools" / "azurite" / "node_modules" / ".bin" / "azurite-blob"

# Azurite's well-known development account (published in Azure's documentation; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteError(RuntimeError):
    """Azurite could not be found, started or reached."""


def find_binary() -> str:
    override = os.environ.get("AZURITE_BLOB_BIN")
    if override:
        if not os.path.isfile(override):
            raise AzuriteError(f"AZURITE_BLOB_BIN points to no file: {override}")
        return override
    if BINARY.is_file():
        return str(BINARY)
    on_path = shutil.which("azurite-blob")
    if on_path:
        return on_path
    raise AzuriteError("azurite-blob not found (run deploy/install_azurite.sh, or `make test`, which runs it)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connection_string(endpoint: str, key: str = ACCOUNT_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={endpoint};")


class Azurite:
    """One ``azurite-blob`` process: start, wait until it answers, stop."""

    def __init__(self, startup_timeout: float = 90.0):
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.location: str | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return connection_string(self.endpoint)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Azurite:
        binary = find_binary()
        self.location = tempfile.mkdtemp(prefix="azurite-")
        self.port = free_port()
        # --loose: headers the emulator does not know are ignored, not refused; --skipApiVersionCheck: the
        # SDK may be newer than the emulator; the telemetry switch keeps the tests off the network.
        cmd = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location", self.location,
               "--silent", "--loose", "--skipApiVersionCheck", "--disableTelemetry"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                self.stop()
                raise AzuriteError(f"azurite-blob exited with {self.proc.returncode}: {out[-2000:]}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise AzuriteError(f"azurite-blob did not answer within {self.startup_timeout:.0f} s")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}?comp=list", timeout=2)
        except urllib.error.HTTPError:
            return True  # 403 without credentials: it is serving
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        if self.location:
            shutil.rmtree(self.location, ignore_errors=True)
            self.location = None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
