"""HTTP(S) plumbing shared by the CRM simulators: serving, TLS, counting, faults.

A simulator is an :class:`App`: a pure ``handle(Request) -> Response`` plus the
vendor-specific shape of each injected fault. :class:`SimServer` serves an App on
127.0.0.1 (ephemeral port by default) in a daemon thread, counts requests per
endpoint, and applies the fault plan before the App sees a request.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

FAULT_KINDS = ("rate_limit", "server_error", "delay", "drop", "expired_session", "partial",
               "hold_answer", "late_apply")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def q(self, name: str, default: str | None = None) -> str | None:
        vals = self.query.get(name)
        return vals[0] if vals else default


@dataclass
class Response:
    status: int
    body: Any = None  # JSON-able, bytes, or None (empty body)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """The next ``count`` matching requests get this fault.

    ``endpoint`` matches the App's endpoint name (e.g. ``contacts.search``,
    ``query``) exactly, or by prefix when it ends with ``*``; None matches all.
    kinds: rate_limit (429 / REQUEST_LIMIT_EXCEEDED), server_error (``status``,
    default 503), delay (sleep ``delay`` seconds then answer normally), drop
    (close the connection without answering), expired_session (401 in the
    vendor's shape), partial (batch writes fail for ``ids``; not consumed by
    requests that do not touch those ids), hold_answer (the request is applied at once,
    its answer held ``delay`` seconds: a client killed meanwhile never learns it landed),
    late_apply (answered at once with ``status``, e.g. 504, and applied ``delay`` seconds
    later: a gateway timeout after which the CRM still does the work).
    """

    kind: str
    count: int = 1
    endpoint: str | None = None
    status: int = 503
    retry_after: float | None = None
    delay: float = 0.0
    ids: frozenset[str] = frozenset()
    message: str | None = None

    def matches(self, endpoint: str) -> bool:
        if self.endpoint is None:
            return True
        if self.endpoint.endswith("*"):
            return endpoint.startswith(self.endpoint[:-1])
        return endpoint == self.endpoint


class App(Protocol):
    name: str

    def endpoint(self, req: Request) -> str:
        """A stable endpoint name for counting and fault matching."""
        ...

    def handle(self, req: Request, faults: FaultPlan) -> Response: ...

    def fault_response(self, fault: Fault, req: Request) -> Response:
        """The vendor's real answer for a rate_limit / server_error / expired_session fault."""
        ...


class FaultPlan:
    """Thread-safe queue of faults to inject."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, endpoint: str) -> Fault | None:
        """Consume one non-partial fault matching ``endpoint``."""
        with self._lock:
            for f in self._faults:
                if f.kind != "partial" and f.matches(endpoint):
                    f.count -= 1
                    if f.count <= 0:
                        self._faults.remove(f)
                    return f
        return None

    def failing_ids(self, endpoint: str, ids: set[str]) -> set[str]:
        """For batch writes: which of ``ids`` must fail (consumes one use of a matching partial fault)."""
        with self._lock:
            for f in self._faults:
                if f.kind == "partial" and f.matches(endpoint) and f.ids & ids:
                    f.count -= 1
                    if f.count <= 0:
                        self._faults.remove(f)
                    return set(f.ids & ids)
        return set()


class SimServer:
    """Serves one App on 127.0.0.1 in a background thread."""

    def __init__(self, app: App, *, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.faults = FaultPlan()
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()  # answers by HTTP status (429s, 403s...)
        self._times: list[tuple[float, str]] = []  # (monotonic time, endpoint) of every request
        self._count_lock = threading.Lock()
        # (endpoint, request) of every request once :meth:`log_requests` is called (off by default:
        # the benchmarks send hundreds of thousands)
        self.request_log: list[tuple[str, Request]] | None = None
        self._ssl = ssl_context
        self._httpd = _Server(("127.0.0.1", port), _make_handler(self))
        if ssl_context is not None:
            self._httpd.socket = ssl_context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> SimServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"sandbox-{self.app.name}",
                                        daemon=True, kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def inject(self, kind: str, count: int = 1, endpoint: str | None = None, **kw: Any) -> None:
        """Inject a fault (see :class:`Fault`)."""
        if "ids" in kw:
            kw["ids"] = frozenset(kw["ids"])
        self.faults.add(Fault(kind=kind, count=count, endpoint=endpoint, **kw))

    def request_count(self, endpoint: str | None = None) -> int:
        with self._count_lock:
            if endpoint is None:
                return sum(self.counts.values())
            if endpoint.endswith("*"):
                return sum(v for k, v in self.counts.items() if k.startswith(endpoint[:-1]))
            return self.counts[endpoint]

    def reset_counts(self) -> None:
        with self._count_lock:
            self.counts.clear()
            self.statuses.clear()
            self._times.clear()

    def _count(self, endpoint: str, req: Request | None = None) -> None:
        with self._count_lock:
            self.counts[endpoint] += 1
            self._times.append((time.monotonic(), endpoint))
            if self.request_log is not None and req is not None:
                self.request_log.append((endpoint, req))

    def log_requests(self) -> list[tuple[str, Request]]:
        """Keep every request from now on (tests assert what was asked); returns the log."""
        with self._count_lock:
            self.request_log = []
            return self.request_log

    def _answered(self, status: int) -> None:
        with self._count_lock:
            self.statuses[status] += 1

    def request_times(self, endpoint: str | None = None) -> list[float]:
        """Monotonic arrival times of the requests (to ``endpoint``; a ``*`` suffix: by prefix)."""
        with self._count_lock:
            times = list(self._times)
        if endpoint is None:
            return [t for t, _ in times]
        if endpoint.endswith("*"):
            return [t for t, e in times if e.startswith(endpoint[:-1])]
        return [t for t, e in times if e == endpoint]

    def max_in_window(self, seconds: float = 10.0, endpoint: str | None = None) -> int:
        """The most requests that arrived within any ``seconds`` (the CRMs' burst measure)."""
        times = self.request_times(endpoint)
        best = lo = 0
        for hi, t in enumerate(times):
            while t - times[lo] >= seconds:
                lo += 1
            best = max(best, hi - lo + 1)
        return best


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._open: set[Any] = set()
        self._open_lock = threading.Lock()

    def get_request(self) -> Any:
        conn, addr = super().get_request()
        with self._open_lock:
            self._open.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on every open (keep-alive) connection: a stopped server answers nothing."""
        import socket as _socket

        with self._open_lock:
            conns, self._open = list(self._open), set()
        for c in conns:
            try:
                c.shutdown(_socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: ARG002 - quiet on client hang-ups
        pass


def _make_handler(server: SimServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out as separate writes: without TCP_NODELAY, Nagle + delayed
        # ACK stall every keep-alive response by ~40 ms (10-20x slower batch throughput).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            req = Request(self.command, parts.path, parse_qs(parts.query, keep_blank_values=True),
                          {k.lower(): v for k, v in self.headers.items()}, body)
            try:
                endpoint = server.app.endpoint(req)
            except Exception:  # noqa: BLE001 - an unknown path is a 404, never a traceback
                endpoint = "unknown"
            server._count(endpoint, req)
            fault = server.faults.take(endpoint)
            if fault is not None and fault.kind == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.delay)
                fault = None
            if fault is not None and fault.kind == "late_apply":
                threading.Timer(fault.delay, _apply_late, args=(server, req)).start()
            held = fault.delay if fault is not None and fault.kind == "hold_answer" else 0.0
            if held:
                fault = None
            try:
                if fault is not None:
                    resp = server.app.fault_response(fault, req)
                else:
                    resp = server.app.handle(req, server.faults)
            except Exception as exc:  # noqa: BLE001 - the simulator answers 500 like a real server would
                resp = Response(500, {"status": "error", "message": f"internal simulator error: {exc}"})
            if held:
                time.sleep(held)
            self._send(resp)

        def _send(self, resp: Response) -> None:
            server._answered(resp.status)
            if resp.body is None:
                payload = b""
            elif isinstance(resp.body, bytes | bytearray):
                payload = bytes(resp.body)
            else:
                payload = json.dumps(resp.body, separators=(",", ":")).encode()
            self.send_response(resp.status)
            headers = {"Content-Type": "application/json;charset=UTF-8", **resp.headers}
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if payload:
                self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    return Handler


def _apply_late(server: SimServer, req: Request) -> None:
    """A ``late_apply`` fault's request, landing after its client was told it failed."""
    with contextlib.suppress(Exception):  # nobody waits for this answer
        server.app.handle(req, server.faults)


def untrusted_tls() -> ssl.SSLContext:
    """A server context whose certificate no sandbox client trusts (another throwaway CA):
    what a TLS-intercepting proxy or a wrong certificate looks like to syncd."""
    import trustme

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA(organization_name="not the syncd sandbox CA").issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


def make_tls(directory: str) -> tuple[ssl.SSLContext, str]:
    """A throwaway CA (trustme) and a server context for 127.0.0.1/localhost.

    Returns the server SSL context and the path of the CA bundle clients must trust.
    """
    import os

    import trustme

    ca = trustme.CA(organization_name="syncd sandbox CA")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_path = os.path.join(directory, "sandbox-ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return ctx, ca_path
