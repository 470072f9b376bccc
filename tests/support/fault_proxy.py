"""A small fault-injecting HTTP proxy for tests, on a free 127.0.0.1 port.

It sits in front of an HTTP server (the GCS emulator) and, per request, with a
fixed random seed, either forwards it, answers 503 without forwarding it, or
closes the connection without answering -- before forwarding the request
(the request is lost) or after forwarding it (the request took effect but the
answer is lost). It counts what it did and logs every request. ``fail_status``
turns the injected 503 into another status (403, say, for a permanent error);
``delay`` holds each request matching ``delay_match`` that long before
forwarding it (or, if callable, ``delay(method, path)`` seconds), to widen the
windows between requests that a watcher observes. ``strip_query`` names query
parameters it removes (``ifGenerationMatch``: a gateway that drops
preconditions), ``strip_headers`` the request headers (``If-None-Match``).

Bounds: it never injects more than ``max_consecutive_faults`` faults in a row
(gcsfs retries 6 times, so with the default of 2 every request finally goes
through), at most ``max_faults`` in all, answers at most ``max_requests``
requests (503 past that, never forwarded) and shuts itself down after
``lifetime`` seconds at the latest. It runs an asyncio loop in a daemon thread
and uses aiohttp only.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from yarl import URL

FORWARD = "forward"
FAIL_503 = "503"
DROP = "drop"  # connection closed before the request was forwarded
DROP_AFTER = "drop_after"  # request forwarded and applied, answer dropped
OVER_BUDGET = "over_budget"

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}

_ERROR_503 = (
    b'{"error":{"code":503,"message":"injected fault: service unavailable",'
    b'"errors":[{"reason":"backendError","message":"injected fault"}]}}'
)


@dataclass
class Counters:
    requests: int = 0
    forwarded: int = 0
    failed_503: int = 0
    dropped: int = 0
    dropped_after: int = 0
    over_budget: int = 0
    upstream_errors: int = 0
    bytes_in: int = 0  # request bodies received from clients
    bytes_out: int = 0  # response bodies sent (or dropped) to clients

    @property
    def faults(self) -> int:
        return self.failed_503 + self.dropped + self.dropped_after


@dataclass
class Entry:
    method: str
    path: str  # raw path with query string
    action: str
    status: int | None = None
    request_bytes: int = 0
    response_bytes: int = 0


@dataclass
class FaultProxy:
    upstream: str
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    drop_after_rate: float = 0.0
    seed: int = 1234
    max_consecutive_faults: int = 2
    max_faults: int | None = None
    max_requests: int = 5000
    lifetime: float = 120.0
    match: Callable[[str, str], bool] | None = None
    fail_status: int = 503
    delay: float | Callable[[str, str], float] = 0.0
    delay_match: Callable[[str, str], bool] | None = None
    # Query parameters removed before forwarding: what a gateway that drops preconditions amounts to.
    strip_query: tuple[str, ...] = ()
    # Request headers removed before forwarding (``If-None-Match``: an S3 or Azure gateway that drops them).
    strip_headers: tuple[str, ...] = ()
    # Forward the client's Host header (a signed one: S3's SigV4, Azure's Shared Key) instead of the upstream's.
    keep_host: bool = False
    counters: Counters = field(default_factory=Counters)
    log: list[Entry] = field(default_factory=list)

    def __post_init__(self):
        for name in ("fail_rate", "drop_rate", "drop_after_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        self.upstream = self.upstream.rstrip("/")
        self._rng = random.Random(self.seed)
        self._consecutive = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._stopped = threading.Event()
        self._started_at = 0.0
        self.port: int | None = None

    # -- configuration --------------------------------------------------------
    def configure(self, *, fail_rate=None, drop_rate=None, drop_after_rate=None,
                  seed=None, match=..., max_faults=..., fail_status=None,
                  delay=None, delay_match=..., max_consecutive_faults=None) -> None:
        """Change the fault mix (and optionally reseed) while running."""
        with self._lock:
            if fail_rate is not None:
                self.fail_rate = fail_rate
            if drop_rate is not None:
                self.drop_rate = drop_rate
            if drop_after_rate is not None:
                self.drop_after_rate = drop_after_rate
            if seed is not None:
                self.seed = seed
                self._rng = random.Random(seed)
            if match is not ...:
                self.match = match
            if max_faults is not ...:
                self.max_faults = max_faults
            if fail_status is not None:
                self.fail_status = fail_status
            if delay is not None:
                self.delay = delay
            if delay_match is not ...:
                self.delay_match = delay_match
            if max_consecutive_faults is not None:
                self.max_consecutive_faults = max_consecutive_faults
            self._consecutive = 0

    def reset_counters(self) -> None:
        with self._lock:
            self.counters = Counters()
            self.log = []
            self._consecutive = 0

    def count(self, method: str | None = None, contains: str | None = None,
              action: str | None = None) -> int:
        """Logged requests matching a method, a path substring and an action."""
        with self._lock:
            return sum(
                1
                for e in self.log
                if (method is None or e.method == method)
                and (contains is None or contains in e.path)
                and (action is None or e.action == action)
            )

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("proxy not started")
        return f"http://127.0.0.1:{self.port}"

    # -- decisions ------------------------------------------------------------
    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            c = self.counters
            c.requests += 1
            if c.requests > self.max_requests:
                c.over_budget += 1
                return OVER_BUDGET
            roll = self._rng.random()  # drawn for every request: reproducible
            eligible = (
                (self.match is None or self.match(method, path))
                and self._consecutive < self.max_consecutive_faults
                and (self.max_faults is None or c.faults < self.max_faults)
            )
            action = FORWARD
            if eligible:
                if roll < self.fail_rate:
                    action = FAIL_503
                elif roll < self.fail_rate + self.drop_rate:
                    action = DROP
                elif roll < self.fail_rate + self.drop_rate + self.drop_after_rate:
                    action = DROP_AFTER
            if action == FORWARD:
                self._consecutive = 0
            else:
                self._consecutive += 1
            if action == FAIL_503:
                c.failed_503 += 1
            elif action == DROP:
                c.dropped += 1
            elif action == DROP_AFTER:
                c.dropped_after += 1
            return action

    # -- serving --------------------------------------------------------------
    @staticmethod
    def _abort(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()  # RST/close without writing an answer

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        method, path = request.method, request.raw_path
        action = self._decide(method, path)
        entry = Entry(method, path, action, request_bytes=len(body))
        with self._lock:
            self.log.append(entry)
            self.counters.bytes_in += len(body)

        if action in (FAIL_503, OVER_BUDGET):
            status = self.fail_status if action == FAIL_503 else 503
            entry.status = status
            body = _ERROR_503 if status == 503 else (
                b'{"error":{"code":%d,"message":"injected fault"}}' % status)
            return web.Response(status=status, body=body, content_type="application/json")
        if action == DROP:
            self._abort(request)
            return web.Response(status=599)  # never reaches the closed socket

        if self.delay and (self.delay_match is None or self.delay_match(method, path)):
            pause = self.delay(method, path) if callable(self.delay) else self.delay
            if pause > 0:
                await asyncio.sleep(pause)
        headers = {
            k: v for k, v in request.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() not in {h.lower() for h in self.strip_headers}
        }
        if self.keep_host and "Host" in request.headers:
            headers["Host"] = request.headers["Host"]
        if self.strip_query and "?" in path:
            head, query = path.split("?", 1)
            kept = [p for p in query.split("&") if p.split("=", 1)[0] not in self.strip_query]
            path = head + ("?" + "&".join(kept) if kept else "")
        try:
            async with self._session.request(
                method,
                URL(self.upstream + path, encoded=True),
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                # Else aiohttp gives a PUT or POST without one "Content-Type: application/octet-stream",
                # which breaks Azure's Shared Key signature (it covers Content-Type): Azurite answers 403.
                skip_auto_headers=("Content-Type",),
            ) as resp:
                payload = await resp.read()
                status = resp.status
                resp_headers_all = list(resp.headers.items())
                out_headers = [(k, v) for k, v in resp_headers_all if k.lower() not in _HOP_BY_HOP]
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            with self._lock:
                self.counters.upstream_errors += 1
            entry.status = 502
            return web.Response(status=502, text=f"upstream error: {e!r}")

        entry.status = status
        entry.response_bytes = len(payload)
        with self._lock:
            self.counters.bytes_out += len(payload)
            if action == FORWARD:
                self.counters.forwarded += 1
        if action == DROP_AFTER:
            self._abort(request)
            return web.Response(status=599)

        response = web.Response(status=status, body=payload)
        if method == "HEAD":  # no body to count: the object's size is the upstream's Content-Length
            length = next((v for k, v in resp_headers_all if k.lower() == "content-length"), None)
            if length is not None:
                response.headers["Content-Length"] = length
        for k, v in out_headers:
            if k.lower() == "location":
                v = v.replace(self.upstream, self.url)
            response.headers.add(k, v)
        return response

    async def _start_async(self, sock: socket.socket) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=30),
            connector=aiohttp.TCPConnector(limit=32),
        )
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()

    async def _stop_async(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def start(self) -> FaultProxy:
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run():
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_async(sock))
            except BaseException as e:  # pragma: no cover - start failure
                errors.append(e)
                ready.set()
                return
            # bounded life: stop by itself after `lifetime` seconds
            self._loop.call_later(self.lifetime, self._loop.stop)
            ready.set()
            try:
                self._loop.run_forever()
            finally:
                self._loop.run_until_complete(self._stop_async())
                self._loop.close()
                self._stopped.set()

        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        if errors:
            raise RuntimeError(f"fault proxy did not start: {errors[0]!r}")
        return self

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop = self._loop
        if loop is not None and not self._stopped.is_set():
            try:
                loop.call_soon_threadsafe(loop.stop)
            except RuntimeError:
                pass  # loop already closed
        thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
