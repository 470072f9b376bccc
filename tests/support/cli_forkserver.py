"""CLI runs forked from one process that imported TensorFlow once, instead of starting Python anew.

Example::

    server = CliForkServer.start()
    rc, out, err = server.run(["status", "--config", "m.yaml"], env=dict(os.environ), cwd="/tmp", timeout=60)
    server.close()

Importing TensorFlow and Keras takes about five seconds of CPU, and the suite
runs the CLI a few hundred times. This server imports them once (no op run, so
no TensorFlow thread exists yet), and the libraries of the config and of the
storage clients (``LIBRARIES``), and forks a child per command. The child is a
process of its own: it gets the request's argv, environment (its PYTHONPATH
put first on ``sys.path`` and a ``sitecustomize`` there imported, as at
start-up), working directory and its own stdout/stderr, calls :func:`tf_export_pipeline.cli.main` as
``python -m tf_export_pipeline`` does, and its exit status is the command's.
The pipeline's own modules are imported by each child, after its environment
is set. Its first TensorFlow op (where TensorFlow probes for a GPU and logs) runs
in the child, under the CLI's own stderr filter.

What a forked child cannot show is how a fresh process starts (the import's
log lines, the console script): the tests of those start Python anew
(``run_cli(..., fresh=True)``), and so does every test that kills, races or
confines a CLI process (they start it with ``subprocess.Popen``).
``TF_EXPORT_TEST_FRESH_CLI=1`` makes every run start Python anew.

A forked command's validation process comes from the same server: the child's
``sys.executable`` is a small launcher (written next to the socket) that, for
``-m tf_export_pipeline.validate.worker``, asks the server to fork a child that
runs that module with the launcher's stdin, stdout and stderr, and waits for its
status. So does a worker of a forked command's ``multiprocessing`` pool (``backfill
--jobs``, the "spawn" context: ``-c "from multiprocessing.spawn import spawn_main..."
--multiprocessing-fork``): the launcher sends the descriptors the worker was given
(its pipe, the resource tracker's, the queues'), which the child takes at the same
numbers, and a SIGINT ignored at start stays ignored in the child, as in a new
Python. For anything else the launcher execs the real Python. The validation child never
held the exporter's objects (it is forked from the server, not from the
command), so what the gate proves is unchanged: the SavedModel is loaded from
disk by another process. When the launcher dies (a timeout or a kill of the
command's process group), the server kills the child it stands for.

The server is single-threaded (forking a threaded process can copy a held
lock): one ``select`` loop accepts requests and reaps children.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

# What the children share: TensorFlow, Keras and what they pull in (nothing of this project).
PRELOAD = ("numpy", "tensorflow", "keras")
# And the libraries under the config and the storage clients, which a command on a bucket or container would
# take half a second to import. Not fsspec, gcsfs, s3fs or adlfs, nor google.auth's compute_engine: their
# imports read settings from the environment, which is each command's own.
LIBRARIES = ("yaml", "pydantic.main", "pydantic.fields", "pydantic.functional_validators", "aiohttp",
             "cryptography.hazmat.bindings._rust", "google.auth", "google.oauth2.credentials", "botocore.session",
             "aiobotocore.session", "azure.core", "azure.storage.blob.aio")
# The modules a forked command's launcher runs in a child of the server rather than in a new Python.
FORKED_MODULES = ("tf_export_pipeline.validate.worker",)
SOCKET_ENV = "TF_EXPORT_TEST_FORK_SOCKET"
REAL_PYTHON_ENV = "TF_EXPORT_TEST_REAL_PYTHON"

# The launcher a forked command sees as sys.executable; run by the real Python with -SE (stdlib only).
LAUNCHER = """\
import json, os, signal, socket, sys

args = sys.argv[1:]
path = os.environ.get({socket_env!r})
request = {{"env": dict(os.environ), "cwd": os.getcwd(), "watch": True, "mount_ns": os.getpid(),
           "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}}
extra = []
if path and len(args) >= 2 and args[0] == "-m" and args[1] in {modules!r}:
    request.update(module=args[1], argv=args[2:])
elif path and len(args) >= 3 and args[-3] == "-c" and args[-1] == "--multiprocessing-fork" \
        and args[-2].startswith("from multiprocessing.spawn import spawn_main; spawn_main("):
    # A multiprocessing "spawn" child: its code, and the descriptors it was given (its pipe, the resource
    # tracker's, those of the pool's queues: the only inheritable ones past stderr), at their numbers.
    extra = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) > 2 and os.get_inheritable(int(name)):
                extra.append(int(name))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    request.update(spawn=args[-2], fd_numbers=extra)
else:
    real = os.environ.get({real_env!r}) or {real!r}
    os.execv(real, [real, *args])
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(path)
socket.send_fds(conn, [json.dumps(request).encode() + b"\\n"], [0, 1, 2, *extra])
reader = conn.makefile("r")
pid = int(json.loads(reader.readline())["pid"])

def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass

for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, forward)
line = reader.readline()
rc = int(json.loads(line)["rc"]) if line else 1
if rc < 0:
    signal.signal(-rc, signal.SIG_DFL)
    os.kill(os.getpid(), -rc)
sys.exit(rc)
"""


class CliForkServer:
    """The test side: starts the server process and sends it one command per connection."""

    def __init__(self, proc: subprocess.Popen, path: str, folder: str):
        self.proc, self.path, self.folder = proc, path, folder

    @classmethod
    def start(cls, env: dict | None = None) -> CliForkServer:
        folder = tempfile.mkdtemp(prefix="tf-export-forkserver-")
        path = os.path.join(folder, "socket")
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.cli_forkserver", path], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        line = proc.stdout.readline()
        if line.strip() != "ready":
            proc.kill()
            raise RuntimeError(f"CLI fork server did not start (exit {proc.wait()})")
        return cls(proc, path, folder)

    def alive(self) -> bool:
        return self.proc.poll() is None

    @contextlib.contextmanager
    def validations_forked(self):
        """In the block, a validation process this (test) process starts (``python -m
        tf_export_pipeline.validate.worker``, through ``sys.executable``) is forked by the server, as a
        forked command's is; any other Python it starts is the real one."""
        saved = sys.executable, os.environ.get(SOCKET_ENV)
        sys.executable = launcher_of(self.path)
        os.environ[SOCKET_ENV] = self.path
        try:
            yield
        finally:
            sys.executable = saved[0]
            if saved[1] is None:
                os.environ.pop(SOCKET_ENV, None)
            else:
                os.environ[SOCKET_ENV] = saved[1]

    def popen(self, argv: list[str], env: dict, cwd: str | None = None,
              start_new_session: bool = False, mount_namespace_of: int | None = None,
              hostname: str | None = None) -> ForkedProcess:
        """Start ``tf-export ARGV`` in a forked child and return at once, as ``subprocess.Popen`` with
        ``stdout=PIPE, stderr=PIPE, text=True`` does (``start_new_session`` too). With
        ``mount_namespace_of``, the child enters that process's mount namespace first (``nsenter -m``); with
        ``hostname``, it runs in a UTS namespace of its own under that name (``unshare -u``; root only)."""
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd or os.getcwd(),
                              "session": start_new_session, "mount_ns": mount_namespace_of,
                              "hostname": hostname}).encode()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            socket.send_fds(conn, [request + b"\n"], [out_w, err_w])
            conn.shutdown(socket.SHUT_WR)
        finally:
            os.close(out_w)
            os.close(err_w)
        return ForkedProcess(["tf-export", *argv], conn, os.fdopen(out_r, "r"), os.fdopen(err_r, "r"))

    def run(self, argv: list[str], env: dict, cwd: str | None, timeout: float,
            mount_namespace_of: int | None = None) -> tuple[int, str, str]:
        """Run ``tf-export ARGV`` in a forked child; (exit status, stdout, stderr). Raises
        ``subprocess.TimeoutExpired`` (after killing the child) when it runs longer than ``timeout``."""
        request = json.dumps({"argv": argv, "env": env, "cwd": cwd or os.getcwd(),
                              "mount_ns": mount_namespace_of}).encode()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            socket.send_fds(conn, [request + b"\n"], [out.fileno(), err.fileno()])
            conn.shutdown(socket.SHUT_WR)
            reader = conn.makefile("r")
            pid = int(json.loads(reader.readline())["pid"])
            conn.settimeout(timeout)
            try:
                line = reader.readline()
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(["tf-export", *argv], timeout) from None
            if not line:
                raise RuntimeError("CLI fork server went away during a command")
            rc = int(json.loads(line)["rc"])
            out.seek(0)
            err.seek(0)
            return rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


class ForkedProcess:
    """What :meth:`CliForkServer.popen` returns: the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, args: list[str], conn: socket.socket, stdout, stderr):
        self.args, self._conn, self.stdout, self.stderr = args, conn, stdout, stderr
        self._buffer = b""
        self.pid = int(json.loads(self._line(None))["pid"])
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next line, or None when none came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return None
            data = self._conn.recv(4096)
            if not data:
                raise RuntimeError("CLI fork server went away during a command")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _read_status(self, timeout: float | None) -> int | None:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                return None
            self.returncode = int(json.loads(line)["rc"])
            self._conn.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read_status(0)

    def wait(self, timeout: float | None = None) -> int:
        rc = self._read_status(timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        import threading

        chunks: dict[str, str] = {}

        def drain(name, stream):
            chunks[name] = stream.read()

        threads = [threading.Thread(target=drain, args=(n, s), daemon=True)
                   for n, s in (("out", self.stdout), ("err", self.stderr))]
        for t in threads:
            t.start()
        self.wait(timeout)
        for t in threads:
            t.join(timeout)
        return chunks.get("out", ""), chunks.get("err", "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for stream in (self.stdout, self.stderr):
            stream.close()
        self.wait()


# -- the server process ---------------------------------------------------------------
def _installed(name: str) -> bool:
    """Whether module ``name`` is there to import (an extra left out installs none of its libraries)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _preload() -> None:
    import threading

    from tf_export_pipeline.quiet_tf import import_modules_silently

    import_modules_silently(PRELOAD)
    import_modules_silently(tuple(m for m in LIBRARIES if _installed(m)))
    if threading.active_count() != 1:  # a thread would be copied into every child mid-way
        raise RuntimeError(f"the fork server imports started threads: {threading.enumerate()}")


def _start_up_paths(env: dict) -> None:
    """What Python's start-up does with the command's PYTHONPATH: its folders come first on sys.path, and
    a ``sitecustomize`` among them is imported (tests use one to watch or break a command from inside)."""
    import importlib

    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[0:0] = extra
    if any(os.path.isfile(os.path.join(p, "sitecustomize.py")) for p in extra):
        sys.modules.pop("sitecustomize", None)
        importlib.import_module("sitecustomize")


def _enter_mount_namespace(pid: int) -> None:
    """``nsenter -t PID -m`` for this (single-threaded, forked) process: setns(2) on PID's mount namespace."""
    import ctypes

    if os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
        return

    clone_newns = 0x00020000
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY)
    try:
        if libc.setns(fd, clone_newns) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the mount namespace of {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _own_hostname(name: str) -> None:
    """``unshare -u`` and ``hostname NAME`` for this (forked, single-threaded) process."""
    import ctypes

    clone_newuts = 0x04000000
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(clone_newuts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWUTS): {os.strerror(err)}")
    socket.sethostname(name)


def launcher_of(path: str) -> str:
    """Where the server with its socket at ``path`` writes its launcher."""
    return os.path.join(os.path.dirname(path), "python")


def _write_launcher(path: str) -> str:
    """The launcher, next to the server's socket at ``path``."""
    launcher = launcher_of(path)
    with open(launcher, "w", encoding="utf-8") as fh:
        fh.write(f"#!{sys.executable} -SE\n")  # one option word: a shebang passes what follows as one argument
        fh.write(LAUNCHER.format(socket_env=SOCKET_ENV, modules=FORKED_MODULES, real_env=REAL_PYTHON_ENV,
                                 real=sys.executable))
    os.chmod(launcher, 0o755)
    return launcher


def _run_module(request: dict) -> int:
    """``python -m MODULE ARGV`` in this child (a validation process of a forked command)."""
    import runpy

    sys.argv = [request["module"], *request["argv"]]
    os.environ.pop(SOCKET_ENV, None)  # its own children start Python anew
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    return 0


def _run_spawn(request: dict, launcher: str) -> int:
    """``python -c "from multiprocessing.spawn import spawn_main; ..." --multiprocessing-fork`` in this child:
    a worker of a forked command's ``multiprocessing`` pool (the "spawn" context). It reads what to run from
    the pipe its parent named, as a new Python would; its own Python subprocesses (a validation process) come
    from the server too."""
    import multiprocessing

    sys.argv = ["-c", "--multiprocessing-fork"]
    sys.executable = launcher
    multiprocessing.set_executable(launcher)
    exec(compile(request["spawn"], "<string>", "exec"), {"__name__": "__main__"})
    return 0


def _run_command(request: dict, path: str, launcher: str) -> int:
    """``tf-export ARGV`` in this child; its Python subprocesses start from ``launcher``, which asks the server
    at ``path`` for a validation process."""
    sys.argv = ["tf-export", *request["argv"]]
    os.environ[SOCKET_ENV] = path
    os.environ[REAL_PYTHON_ENV] = sys.executable
    sys.executable = launcher
    import multiprocessing

    multiprocessing.set_executable(launcher)  # a backfill's "spawn" workers: forked by the server too
    from tf_export_pipeline.cli import main

    return main(request["argv"])


def _child(request: dict, fds: list[int], path: str, launcher: str) -> None:
    """In the forked child: become the command, run it, exit with its status. Never returns."""
    rc = 1
    try:
        if request.get("session"):
            os.setsid()
        # As a new Python started by the launcher's process would: SIGINT ignored when it was there.
        signal.signal(signal.SIGINT, signal.SIG_IGN if request.get("sigint_ignored")
                      else signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The launcher's requests send stdin, stdout, stderr and then the descriptors a spawn child names, at
        # their numbers there; a command's, stdout and stderr (stdin is /dev/null). Moved out of the way
        # first: a target number may be one of the received ones.
        import fcntl

        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 512) for fd in fds]
        for fd in fds:
            os.close(fd)
        if request.get("module") or request.get("spawn"):
            targets = [0, 1, 2, *request.get("fd_numbers", [])]
        else:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            targets = [1, 2]
        for fd, target in zip(high, targets):
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        if request.get("mount_ns"):
            _enter_mount_namespace(int(request["mount_ns"]))
        if request.get("hostname"):
            _own_hostname(request["hostname"])
        os.chdir(request["cwd"])
        _start_up_paths(request["env"])
        try:
            if request.get("module"):
                rc = _run_module(request)
            elif request.get("spawn"):
                rc = _run_spawn(request, launcher)
            else:
                rc = _run_command(request, path, launcher)
        except SystemExit as exit_:
            code = exit_.code
            rc = code if isinstance(code, int) else (0 if code is None else 1)
            if not isinstance(code, int) and code is not None:
                print(code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what Python would print for an uncaught exception
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(rc if isinstance(rc, int) else 1)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request line and the file descriptors sent with it (closed again when the line is not whole)."""
    fds: list[int] = []
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 64)
        while not msg.endswith(b"\n"):
            more = conn.recv(1 << 20)
            if not more:
                break
            msg += more
        return json.loads(msg), list(fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def serve(path: str) -> None:
    _preload()
    launcher = _write_launcher(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    running: dict[int, socket.socket] = {}  # child pid -> the connection waiting for its status
    watched: dict[socket.socket, int] = {}  # a launcher's connection -> its child: killed when it closes
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print("ready", flush=True)
    while not stop:
        try:
            readable, _, _ = select.select([listener, *watched], [], [], 0.02)
        except InterruptedError:
            continue
        for conn in readable:
            if conn is listener:
                continue
            try:
                gone = not conn.recv(4096)
            except OSError:  # reset by a launcher killed with data unread
                gone = True
            if gone:  # the launcher is gone: so goes its child
                try:
                    os.kill(watched.pop(conn), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if listener in readable:
            conn, _ = listener.accept()
            try:
                request, fds = _read_request(conn)
            except (OSError, ValueError):  # the requester died while asking (a kill of its process group)
                conn.close()
                continue
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                listener.close()
                conn.close()
                for other in running.values():
                    other.close()
                _child(request, fds, path, launcher)
            for fd in fds:
                os.close(fd)
            running[pid] = conn
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:  # whoever asked is gone already (killed): the child has no one to answer to
                os.kill(pid, signal.SIGKILL)
                continue
            if request.get("watch"):
                watched[conn] = pid
        while running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = running.pop(pid, None)
            if conn is not None:
                watched.pop(conn, None)
                rc = os.waitstatus_to_exitcode(status)
                try:
                    conn.sendall(json.dumps({"rc": rc}).encode() + b"\n")
                except OSError:
                    pass  # the test gave up on it (timeout)
                conn.close()
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    listener.close()


if __name__ == "__main__":
    serve(sys.argv[1])
    sys.exit(0)
