"""What both connectors do with a failed call, in one place.

Each connector classifies its vendor's failures into :mod:`syncd.errors` (with
``system=`` set); this module holds the rules they share about *resending*:

- an idempotent call (a read, an update) is retried by the one policy in
  :mod:`connectors._retry`;
- a create whose answer was lost (timeout, dropped connection) or answered with
  a 5xx may have been applied: it is raised to the caller, never sent again here
  (the outbox looks the record up by email before it resends).

And what a failure that never reached an HTTP answer says (:class:`Peer`): the system,
the ``host:port`` and the cause (connection refused, DNS, TLS verification with the CA
bundle, a timeout after N s, a proxy), never a vendor class name nor the request's URL
(a SOQL query string carries emails).
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar
from urllib.parse import urlsplit

from syncd.connectors._retry import RetryPolicy, retrying
from syncd.errors import FatalError, RetriableError

T = TypeVar("T")


class NotRetried(Exception):
    """Carries a :class:`RetriableError` of a create past the retry policy, unretried."""

    def __init__(self, error: RetriableError) -> None:
        super().__init__(str(error))
        self.error = error


def lost_answer(error: RetriableError, *, idempotent: bool) -> Exception:
    """A transport failure: retried for an idempotent call; for a create, raised as it is."""
    return error if idempotent else NotRetried(error)


def may_be_applied(error: Exception, *, idempotent: bool) -> TypeGuard[RetriableError]:
    """A create answered with a 5xx: the CRM does not say whether it applied it."""
    return not idempotent and isinstance(error, RetriableError) and (error.status or 0) >= 500


def call(policy: RetryPolicy, log_name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn(*args, **kw)`` under the retry policy; a :class:`NotRetried` comes out as its error."""
    try:
        return retrying(policy, log_name=log_name)(fn, *args, **kw)
    except NotRetried as e:
        raise e.error from e.__cause__


# -------------------------------------------------------------------- transport failures
@dataclass(frozen=True, slots=True)
class Peer:
    """The CRM endpoint a connector talks to, for naming it in transport errors."""

    system: str
    url: str
    ca_bundle: str | None
    timeout_s: float

    @property
    def address(self) -> str:
        """``host:port`` of the URL (the scheme's default port when it names none)."""
        parts = urlsplit(self.url)
        host = parts.hostname or "?"
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None:
            port = 80 if parts.scheme == "http" else 443
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def transport_error(self, endpoint: str, exc: BaseException, *, idempotent: bool = True) -> Exception:
        """The syncd error for a call that got no HTTP answer: a TLS verification failure is
        fatal (retrying will not change the certificate); anything else is transient (see
        :func:`lost_answer` for creates)."""
        cause, fatal = self.cause(exc)
        message = f"{self.system} {endpoint}: {self.address}: {cause}"
        if fatal:
            return FatalError(message, system=self.system)
        return lost_answer(RetriableError(message, system=self.system), idempotent=idempotent)

    def cause(self, exc: BaseException) -> tuple[str, bool]:
        """(what went wrong in words, whether it is fatal) for a transport exception."""
        chain = list(_chain(exc))
        for rule in _CAUSES:
            said = rule(self, chain)
            if said is not None:
                return said
        return f"transport failure: {_scrub(_root(chain))}", False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps (urllib3's ``reason``, requests' ``args``, causes)."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is s for s in seen):
            continue
        seen.append(e)
        yield e
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]


def _root(chain: list[BaseException]) -> BaseException:
    return chain[-1]


def _find(chain: list[BaseException], *types: type[BaseException]) -> BaseException | None:
    return next((e for e in chain if isinstance(e, types)), None)


def _names(chain: list[BaseException], *names: str) -> BaseException | None:
    """The first exception whose class (or a base's) is called one of ``names`` (vendor classes
    named without importing the vendors here)."""
    return next((e for e in chain if any(t.__name__ in names for t in type(e).__mro__)), None)


_URLISH = re.compile(r"(?:https?://)?[^\s/]*/\S*")  # a URL or path: may carry a query with emails


def _scrub(exc: BaseException) -> str:
    """An exception's own words without class names, URLs or paths; one line."""
    text = getattr(exc, "strerror", None) or str(exc)
    text = re.sub(r"\(Caused by .*", "", " ".join(str(text).split()))
    text = re.sub(r"<[^>]*>", "", _URLISH.sub("…", text)).strip(" :,")
    return text[:200] or "no details"


def _tls_verify(peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    e = _find(chain, ssl.SSLCertVerificationError)
    if e is None:
        return None
    why = getattr(e, "verify_message", None) or _scrub(e)
    against = f"CA bundle {peer.ca_bundle}" if peer.ca_bundle else "the system CA store"
    return f"TLS certificate verify failed ({why}) against {against}", True


def _proxy(_peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    e = _names(chain, "ProxyError")
    return None if e is None else (f"proxy failed: {_scrub(_root(chain))}", False)


def _dns(peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    e = _find(chain, socket.gaierror) or _names(chain, "NameResolutionError")
    if e is None:
        return None
    why = e.strerror if isinstance(e, socket.gaierror) and e.strerror else "no such host"
    return f"DNS lookup of {urlsplit(peer.url).hostname} failed ({why})", False


def _refused(_peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    if _find(chain, ConnectionRefusedError) is None:
        return None
    return "connection refused (nothing listens there)", False


def _tls_other(_peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    e = _find(chain, ssl.SSLError)
    if e is None:
        return None
    reason = getattr(e, "reason", None)
    if isinstance(reason, str) and reason == "WRONG_VERSION_NUMBER":  # a plain-HTTP server on the port
        return "TLS handshake failed (the server does not speak TLS there: an http:// URL?)", True
    return f"TLS handshake failed ({reason if isinstance(reason, str) else _scrub(e)})", False


def _timeout(peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    e = _names(chain, "ConnectTimeoutError", "ConnectTimeout")
    if e is not None and _names(chain, "NewConnectionError") is None:
        return f"timeout after {peer.timeout_s:g} s connecting", False
    if _names(chain, "ReadTimeoutError", "ReadTimeout", "Timeout") or _find(chain, TimeoutError, socket.timeout):
        return f"timeout after {peer.timeout_s:g} s with no answer", False
    return None


def _closed(_peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    if _find(chain, ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
             http.client.RemoteDisconnected) is None and _names(chain, "ProtocolError", "ChunkedEncodingError") is None:
        return None
    return "connection closed before the answer was complete", False


def _os_error(_peer: Peer, chain: list[BaseException]) -> tuple[str, bool] | None:
    e = next((e for e in chain if isinstance(e, OSError) and e.strerror), None)
    return None if e is None else (str(e.strerror).lower(), False)


_Cause = Callable[[Peer, list[BaseException]], "tuple[str, bool] | None"]
# first match wins: the most specific causes first (urllib3's NameResolutionError is also a
# connect "timeout", a refused connection an OSError)
_CAUSES: tuple[_Cause, ...] = (_tls_verify, _proxy, _dns, _refused, _tls_other, _timeout, _closed, _os_error)
