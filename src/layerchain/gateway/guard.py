"""Browsers may not drive the gateway from another site: Host, Origin and Content-Type checks.

The gateway spends its operator's wallet for whoever can reach it, and a web page can make
the visitor's browser send requests to ``127.0.0.1``. Three checks, pure functions of the
request's method and headers (``check``), applied to every HTTP request by ``BrowserGuard``
(a plain ASGI middleware, so streamed responses pass through untouched):

* **Host** (DNS rebinding: a page on ``evil.example`` whose name is made to resolve to
  ``127.0.0.1`` is same-origin with itself, so only the ``Host`` header gives it away):
  accepted are IP literals (a rebinding attack always arrives under a DNS name),
  ``localhost``, and the names in ``allowed_hosts`` (``*`` accepts any).
* **Origin** (cross-site requests): a request that carries an ``Origin`` must come from the
  gateway's own origin (``scheme://Host``: the dashboard it serves) or one of
  ``allowed_origins``; ``Origin: null`` (sandboxed frames, files) is refused. Programs
  (the openai client, curl) send no ``Origin`` and are not affected.
* **Content-Type**: a POST must be ``application/json``, which an HTML form cannot send
  (its ``text/plain``, urlencoded or multipart bodies are refused with 415), and which makes
  a cross-site ``fetch`` need a CORS preflight that the gateway never grants.

The gateway sends no CORS headers at all, so a page of another origin can never read an
answer either.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from layerchain.gateway.schema import ApiError


@dataclass(frozen=True)
class BrowserPolicy:
    """Which Host names and browser origins the gateway answers."""

    hosts: frozenset[str] = frozenset()  # DNS names accepted besides IP literals and localhost
    origins: frozenset[str] = frozenset()  # origins accepted besides the gateway's own
    any_host: bool = False  # ``--allowed-host '*'``: no Host check (behind a trusted proxy)

    @classmethod
    def of(cls, hosts: Iterable[str] = (), origins: Iterable[str] = ()) -> BrowserPolicy:
        names = {h.strip().lower().rstrip(".") for h in hosts if h.strip()}
        return cls(
            hosts=frozenset(names - {"*"}),
            origins=frozenset(o.strip().lower().rstrip("/") for o in origins if o.strip()),
            any_host="*" in names,
        )


def host_name(host: str) -> str:
    """The name of a ``Host`` header without its port: ``[::1]:80`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_allowed(host: str, policy: BrowserPolicy) -> bool:
    name = host_name(host)
    if policy.any_host or name == "localhost" or name in policy.hosts:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check(method: str, scheme: str, headers: Mapping[str, str], policy: BrowserPolicy) -> ApiError | None:
    """The refusal of a request, or None to serve it. ``headers``: lower-case names."""
    host = headers.get("host")
    if host is not None and not host_allowed(host, policy):
        return ApiError(
            403, f"this gateway does not answer for the host {host_name(host)!r}: start it "
            "with --allowed-host NAME to serve under that name", "invalid_request_error",
            "host_not_allowed")
    origin = headers.get("origin")
    if origin is not None:
        origin = origin.strip().lower().rstrip("/")
        own = f"{scheme}://{host.strip().lower()}" if host is not None else None
        if origin != own and origin not in policy.origins:
            return ApiError(
                403, f"requests from the web origin {origin!r} are refused (cross-site): "
                "start the gateway with --allowed-origin ORIGIN to allow it",
                "invalid_request_error", "origin_not_allowed")
    if method == "POST":
        media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return ApiError(415, f"the request body must be JSON with Content-Type: "
                            f"application/json, got {media or 'none'!r}",
                            "invalid_request_error", "unsupported_media_type")
    return None


class BrowserGuard:
    """ASGI middleware: answers a refused request with its error, passes the rest on."""

    def __init__(self, app: ASGIApp, policy: BrowserPolicy) -> None:
        self.app, self.policy = app, policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in scope.get("headers", ())}
            refused = check(scope["method"], scope.get("scheme", "http"), headers, self.policy)
            if refused is not None:
                body = json.dumps(refused.to_json()).encode()
                await send({"type": "http.response.start", "status": refused.status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
