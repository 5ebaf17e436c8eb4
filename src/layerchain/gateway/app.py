"""The gateway's HTTP app: OpenAI-compatible endpoints and the dashboard over one swarm client.

``create_app(config, swarm)`` builds a FastAPI app around a ready ``AsyncSwarm``: one client
serves every request, each generation opens its own sessions. Running it is ``server.py``'s.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent
events, or whole), ``GET /v1/models``, ``GET /health``, ``GET /api/swarm`` (the dashboard's
JSON) and the dashboard itself at ``/`` (static files, no CDN). The shapes are
``schema.py``'s; keys and balances ``keys.py``'s; what the dashboard sees ``activity.py``'s.
A request's routing limits (``alpha``, ``max_price``, ``max_latency_ms``) apply to its own
generation; peers, RTTs and bans are the one client's, shared by every request.

A request's errors are found before its first byte is sent (the first token is awaited
first), so they get their status code; an error mid-stream becomes an ``error`` event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerchain.client import AsyncSwarm, GenerationResult, TokenEvent
from layerchain.errors import InsufficientFunds, LayerchainError, UnknownModel
from layerchain.gateway import schema
from layerchain.gateway.activity import RequestLog, RequestRecord, coverage, nodes_json
from layerchain.gateway.config import GatewayConfig
from layerchain.gateway.keys import ApiKey, KeyStore
from layerchain.gateway.schema import ApiError, GenerationRequest, api_error_for, sse

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
REFRESH_TIMEOUT_S = 5.0  # a dashboard poll waits this long for the DHT, then shows what it has


class Gateway:
    """The app's state: the swarm client, key store and request log."""

    def __init__(self, config: GatewayConfig, swarm: AsyncSwarm) -> None:
        self.config = config
        self.swarm = swarm
        self.spec = swarm.spec
        self.keys = KeyStore(config.keys_file)
        self.requests = RequestLog(config.recent_requests)
        self.started = time.time()
        names = {config.model, self.spec.name, self.spec.model_id}
        if self.spec.name == "smollm2":
            names.add("smollm2-135m-instruct")
        self.model_names = {n.lower() for n in names}

    # ---------------------------------------------------------------- checks

    def check_model(self, name: str | None) -> str:
        """The model's name as responses show it; UnknownModel for any other model."""
        if name is not None and name.lower() not in self.model_names:
            raise UnknownModel(
                f"the model {name!r} does not exist on this gateway",
                hint=f"it serves {self.spec.name!r} (GET /v1/models)",
            )
        return self.spec.name

    def keys_required(self) -> bool:
        return self.config.require_keys or self.keys.enabled()

    async def authenticate(self, request: Request, *, admit: bool) -> ApiKey | None:
        """The caller's key when keys are on (401 without a valid one); with ``admit``,
        also 402 when its balance is <= 0."""
        if not await asyncio.to_thread(self.keys_required):
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        try:
            check = self.keys.admit if admit else self.keys.authenticate
            return await asyncio.to_thread(check, token or None)
        except InsufficientFunds as error:
            raise ApiError(402, str(error), "insufficient_quota", "insufficient_balance") from None

    # ---------------------------------------------------------------- generation

    async def complete(self, request: Request, kind: str) -> Response:
        key = await self.authenticate(request, admit=True)
        body = schema.parse_body(await request.body())
        req = schema.parse_request(
            body, kind, default_max_tokens=self.config.default_max_tokens,
            max_tokens_limit=self.config.max_tokens_limit,
        )
        model = self.check_model(req.model)
        record = self.requests.start(RequestRecord(
            id=schema.new_id(kind), kind=kind, stream=req.stream, created=time.time(),
            user=req.user, key_id=key.key_id if key else None,
            limits={k: v for k, v in vars(req.limits).items() if v is not None},
        ))
        run = Run(self, req, key, record)
        try:
            first = await run.open()
        except BaseException as error:
            await run.close(error)
            raise
        if req.stream:
            return ClosingStreamingResponse(
                self._stream(run, first, model), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        error: BaseException | None = None
        try:
            async for _ in run.rest():
                pass
        except BaseException as e:
            error = e
            raise
        finally:
            await run.close(error)
        return JSONResponse(schema.completion_json(record.id, kind, model, int(record.created),
                                                   run.result[0]))

    async def _stream(self, run: Run, first: TokenEvent | None, model: str) -> AsyncIterator[bytes]:
        req, rid = run.req, run.record.id
        created = int(run.record.created)
        error: BaseException | None = None
        try:
            yield sse(schema.chunk_json(rid, req.kind, model, created, first=True,
                                        text=first.text if first else ""))
            async for event in run.rest():
                if event.text:
                    yield sse(schema.chunk_json(rid, req.kind, model, created, text=event.text))
            await run.close(None)  # debit before the end is sent: a caller sees settled books
            result = run.result[0]
            last = schema.chunk_json(rid, req.kind, model, created, finish_reason=result.finish_reason)
            if req.include_usage:
                yield sse(last)
                yield sse(schema.usage_chunk_json(rid, req.kind, model, created, result))
            else:  # usage in every response: on the last chunk when no usage chunk was asked for
                last["usage"] = schema.usage_json(result.prompt_tokens, len(result.token_ids))
                last["layerchain"] = schema.extension_json(result)
                yield sse(last)
            yield sse("[DONE]")
        except LayerchainError as e:  # mid-stream: the status is sent, so an error event
            error = e
            yield sse(api_error_for(e).to_json())
        except BaseException as e:
            error = e
            raise
        finally:
            await run.close(error)

    async def close(self) -> None:
        """Nothing of its own to close: the caller owns the swarm client."""

    # ---------------------------------------------------------------- views of the swarm

    async def refresh(self) -> None:
        """Re-read the swarm's records when stale; a slow or failing DHT keeps the old ones."""
        try:
            await asyncio.wait_for(self.swarm.peers.refresh(), REFRESH_TIMEOUT_S)
        except (LayerchainError, OSError, asyncio.TimeoutError) as error:
            log.warning("could not refresh the swarm's records: %s", error)

    def health_json(self) -> dict[str, Any]:
        peers = self.swarm.peers
        covered = bool(peers.records) and not peers.uncovered()
        return {"status": "ok" if covered else "degraded", "model": self.spec.name,
                "nodes": len(peers.records), "covered": covered}

    def swarm_json(self) -> dict[str, Any]:
        peers, spec, c = self.swarm.peers, self.spec, self.swarm.config
        counts = coverage(peers.records.values(), spec.num_blocks)
        return {
            "model": {"name": spec.name, "model_id": spec.model_id, "num_blocks": spec.num_blocks},
            "nodes": nodes_json(peers.records.values(), peers.rtt_ms, peers.banned()),
            "coverage": counts,
            "covered": all(counts),
            "requests": self.requests.recent(),
            "totals": dict(self.requests.totals),
            "keys_required": self.keys_required(),
            "limits": {"alpha": c.alpha, "max_price": c.max_price, "max_latency_ms": c.max_latency_ms},
            "uptime_s": round(time.time() - self.started, 1),
        }

    def models_json(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_json()]}

    def model_json(self) -> dict[str, Any]:
        return {
            "id": self.spec.name, "object": "model", "created": int(self.started),
            "owned_by": "layerchain",
            "layerchain": {"model_id": self.spec.model_id, "num_blocks": self.spec.num_blocks,
                           "family": self.spec.family},
        }


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its body generator when the response ends, however
    it ends. Starlette leaves a generator whose caller hung up suspended at its ``yield``
    until the garbage collector finds it, so the sessions and the accounting in its
    ``finally`` would wait for an unknown time (or for the event loop's shutdown)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


class Run:
    """One request's generation through the swarm, with its clean-up and its accounting."""

    def __init__(self, gateway: Gateway, req: GenerationRequest, key: ApiKey | None,
                 record: RequestRecord) -> None:
        self.gateway, self.req, self.key, self.record = gateway, req, key, record
        self.result: list[GenerationResult] = []
        self._events: AsyncIterator[TokenEvent] | None = None
        self._closed = False

    async def open(self) -> TokenEvent | None:
        """Start the generation and wait for its first token (errors show up here, before
        any byte of the response is sent, so they get their proper status)."""
        self._events = self.gateway.swarm.generate_stream(
            list(self.req.prompt) if self.req.kind == "chat" else self.req.prompt,
            self.req.params, raw=self.req.raw, result=self.result, limits=self.req.limits,
        )
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            return None

    async def rest(self) -> AsyncIterator[TokenEvent]:
        assert self._events is not None
        async for event in self._events:
            yield event

    async def close(self, error: BaseException | None) -> None:
        """Close the sessions, log the request and debit the key. Shielded: a caller that
        went away cancels the response, but the nodes' sessions must still be closed."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._events is not None:
                await self._events.aclose()  # type: ignore[attr-defined]
            gw = self.gateway
            result = self.result[0] if self.result else None
            if result is not None and self.key is not None and (
                    result.cost or result.finish_reason != "cancelled"):
                # what the swarm charged, even for a request that failed or was abandoned
                # part way: the peers were paid for every token they computed
                try:
                    await asyncio.to_thread(gw.keys.debit, self.key.key_id, result.cost)
                except LayerchainError as e:
                    log.error("could not debit %s credits from %s: %s", result.cost,
                              self.key.key_id, e)
            if result is not None and result.finish_reason != "cancelled":
                gw.requests.finish(self.record, result)
            elif isinstance(error, LayerchainError):
                gw.requests.fail(self.record, str(error))
            elif error is None or isinstance(error, (asyncio.CancelledError, GeneratorExit)):
                gw.requests.fail(self.record, "the caller went away", status="cancelled")
            else:
                gw.requests.fail(self.record, f"internal error: {type(error).__name__}")


def create_app(config: GatewayConfig, swarm: AsyncSwarm) -> FastAPI:
    """The gateway's app around a ready swarm client (which the caller owns and closes)."""
    gateway = Gateway(config, swarm)
    app = FastAPI(title="layerchain gateway", version="1", docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.to_json(), status_code=error.status)

    @app.exception_handler(LayerchainError)
    async def _layerchain_error(_: Request, error: LayerchainError) -> JSONResponse:
        api = api_error_for(error)
        return JSONResponse(api.to_json(), status_code=api.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), kind).to_json(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _bug(_: Request, error: Exception) -> JSONResponse:
        log.exception("internal error")
        body = ApiError(500, f"internal error: {type(error).__name__}", "server_error").to_json()
        return JSONResponse(body, status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await gateway.complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await gateway.complete(request, "text")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        await gateway.authenticate(request, admit=False)
        return gateway.models_json()

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict:
        await gateway.authenticate(request, admit=False)
        gateway.check_model(model)
        return gateway.model_json()

    @app.get("/health")
    async def health() -> dict:
        await gateway.refresh()
        return gateway.health_json()

    @app.get("/api/swarm")
    async def swarm_state() -> dict:
        await gateway.refresh()
        return gateway.swarm_json()

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
