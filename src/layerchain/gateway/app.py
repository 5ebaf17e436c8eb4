"""The gateway's HTTP app: OpenAI-compatible endpoints and the dashboard over one swarm client.

``create_app(config, swarm)`` builds a FastAPI app around a ready ``AsyncSwarm``: one client
serves every request, each generation opens its own sessions. Running it is ``server.py``'s.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent
events, or whole), ``GET /v1/models``, ``GET /health``, ``GET /api/swarm`` (the dashboard's
JSON), ``GET /api/train/jobs`` (this machine's training job records), ``GET /docs`` and
``/openapi.json``, and the dashboard itself at ``/`` (static files, no CDN). The shapes are
``schema.py``'s; keys and balances ``keys.py``'s; what a request may cost ``billing.py``'s;
what the dashboard sees ``activity.py``'s; the browser checks (Host, Origin, Content-Type)
``guard.py``'s, in front of everything.

Keys fail closed: whether keys are on is decided at start (``keys_on_at_start``: a store
that was named but is missing, or exists but cannot be read, is a start-up error), and once
on they stay on; a store that cannot be read later refuses requests (503), never opens the
gateway. With keys on, everything but ``/health`` and the static dashboard needs a key, and
``/api/swarm`` shows a key only its own requests (an admin key sees all).

A request's routing limits (``alpha``, ``max_price``, ``max_latency_ms``) apply to its own
generation; peers, RTTs and bans are the one client's, shared by every request. With keys
on, a request first reserves the most it can cost on its key (402 when the key's available
credits do not cover it), runs with that as its ``max_cost``, and settles what the swarm
charged when it ends, however it ends.

A request's errors are found before its first byte is sent (the first token is awaited
first), so they get their status code; an error mid-stream becomes an ``error`` event.
401 and 402 come only from the gateway's own key checks, never from the generation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from layerchain.client import AsyncSwarm, TokenEvent
from layerchain.client.swarm import Generation
from layerchain.discovery.catalog import CatalogDiscovery, ModelEntry, list_models
from layerchain.errors import (
    ConfigError,
    InsufficientFunds,
    InvalidApiKey,
    LayerchainError,
    NoRoute,
    RequestTooLarge,
    UnknownModel,
)
from layerchain.gateway import billing, schema
from layerchain.gateway.activity import RequestLog, RequestRecord, nodes_json
from layerchain.gateway.config import GatewayConfig
from layerchain.gateway.guard import BrowserGuard, BrowserPolicy
from layerchain.gateway.keys import ApiKey, Hold, KeyStore
from layerchain.gateway.schema import ApiError, GenerationRequest, api_error_for, key_error, sse
from layerchain.model import DEFAULT_MODEL, encode_prompt, load_tokenizer

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
REFRESH_TIMEOUT_S = 5.0  # a dashboard poll waits this long for the DHT, then shows what it has
CATALOG_TTL_S = 10.0  # /v1/models re-reads the swarm's catalog at most this often (seconds)
MAX_CHARS_PER_TOKEN = 8  # a prompt longer than this many characters per token of context is
# refused untokenized (English runs ~4 characters a token)


def keys_on_at_start(config: GatewayConfig, store: KeyStore) -> bool:
    """Whether the gateway starts with keys on. ConfigError (a start-up error, before the
    swarm is joined) when the store was named (``--keys``) but is missing, or exists but
    cannot be read: a key file that went astray must never open the gateway."""
    if config.keys_path is not None and not store.path.exists():
        raise ConfigError(
            f"no API-key store at {store.path}",
            hint="create a key with `layerchain api keys create --keys FILE`, "
                 "or leave out --keys to use the one in --data-dir",
        )
    return config.require_keys or store.count() > 0  # count() raises for an unreadable store


def _prompt_of(req: GenerationRequest) -> str | list[dict[str, str]]:
    """The request's prompt as the client takes it: text, or a list of messages."""
    return req.prompt if isinstance(req.prompt, str) else list(req.prompt)


def _too_large(param: str, message: str) -> RequestTooLarge:
    return RequestTooLarge(
        message, hint="shorten the prompt or ask for fewer max_tokens", param=param
    )


def store_unavailable(error: LayerchainError) -> ApiError:
    log.error("the key store cannot be read: %s", error)
    return ApiError(503, "the gateway's key store cannot be read; try again later",
                    "server_error", "key_store_unavailable")


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with 413 beyond ``limit`` bytes (before reading it all)."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes",
                         "invalid_request_error", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class Gateway:
    """The app's state: the swarm client, key store and request log."""

    def __init__(self, config: GatewayConfig, swarm: AsyncSwarm) -> None:
        self.config = config
        self.swarm = swarm
        self.spec = swarm.spec
        self.keys = KeyStore(config.keys_file)
        self.keys.keep_open()  # reserve and settle without a WAL checkpoint each
        self._keys_on = keys_on_at_start(config, self.keys)
        self.policy = BrowserPolicy.of(config.allowed_hosts, config.allowed_origins)
        self.requests = RequestLog(config.recent_requests)
        self.started = time.time()
        names = {config.model, self.spec.name, self.spec.model_id}
        if self.spec.name == DEFAULT_MODEL:
            names.add("smollm2-135m-instruct")
        self.model_names = {n.lower() for n in names}
        # tokens of prompt + answer the model can attend to (None: the config does not say)
        self.context_length: int | None = getattr(self.spec.config, "max_position_embeddings", None)
        # the gateway's own copy, used in worker threads (the client's runs on the loop)
        self.tokenizer = load_tokenizer(self.spec)
        self._tokenizer_lock = threading.Lock()
        self.catalog: list[ModelEntry] = []  # the swarm's models (discovery.catalog), last read
        self._catalog_read_at = float("-inf")  # time.monotonic() of that read

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
        """Whether keys are on now (as last seen: ``check_keys`` looks again)."""
        return self._keys_on

    async def check_keys(self) -> bool:
        """Whether keys are on. Once on they stay on; while off, the store is looked at
        again (the operator may create the first key while the gateway runs), and a store
        that cannot be read turns them on: fail closed."""
        if not self._keys_on:
            try:
                self._keys_on = await asyncio.to_thread(self.keys.enabled)
            except LayerchainError as error:
                self._keys_on = True
                raise store_unavailable(error) from None
        return self._keys_on

    async def authenticate(self, request: Request) -> ApiKey | None:
        """The caller's key when keys are on (401 without a valid one); None when off."""
        if not await self.check_keys():
            return None
        try:
            return await asyncio.to_thread(self.keys.authenticate, bearer_token(request))
        except InvalidApiKey as error:
            raise key_error(error) from None
        except LayerchainError as error:
            raise store_unavailable(error) from None

    async def prompt_tokens(self, req: GenerationRequest) -> int:
        """The prompt's length in tokens; RequestTooLarge (400) when prompt + max_tokens
        exceed the model's context. A prompt of more than ``MAX_CHARS_PER_TOKEN`` characters
        per token of context is refused before it is tokenized (a megabyte takes seconds);
        the rest is tokenized off the event loop, with the gateway's own tokenizer."""
        param = "messages" if req.kind == "chat" else "prompt"
        prompt = _prompt_of(req)
        if self.context_length is not None:
            chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
            if chars > self.context_length * MAX_CHARS_PER_TOKEN:
                raise _too_large(param, f"the prompt has {chars} characters, more than the "
                                 f"model's context of {self.context_length} tokens can hold")
        n = await asyncio.to_thread(self._count_tokens, prompt, req.raw)
        if self.context_length is not None and n + req.params.max_new_tokens > self.context_length:
            raise _too_large(param, f"the prompt has {n} tokens and max_tokens is "
                             f"{req.params.max_new_tokens}: more than the model's context of "
                             f"{self.context_length} tokens")
        return n

    def _count_tokens(self, prompt: str | list[dict[str, str]], raw: bool) -> int:
        with self._tokenizer_lock:  # a tokenizer is not safe to use from two threads at once
            return len(encode_prompt(self.tokenizer, prompt, raw=raw))

    async def reserve(self, key: ApiKey, req: GenerationRequest, prompt_tokens: int) -> tuple[Hold, int]:
        """Hold the most the request can cost on ``key`` (402 when it cannot); that amount
        (credits) is the request's ``max_cost``."""
        state = self.swarm.state()
        if not state.usable:
            await self.refresh()
            state = self.swarm.state()
        price = billing.price_cap(req.limits.max_price, state)
        if price == float("inf"):
            raise NoRoute("some blocks have no usable node now; try again later")
        amount = billing.reservation(prompt_tokens, req.params.max_new_tokens, price)
        try:
            hold = await asyncio.to_thread(self.keys.reserve, key.key_id, amount)
        except (InvalidApiKey, InsufficientFunds) as error:
            raise key_error(error) from None
        except LayerchainError as error:
            raise store_unavailable(error) from None
        return hold, amount

    # ---------------------------------------------------------------- generation

    async def complete(self, request: Request, kind: str) -> Response:
        key = await self.authenticate(request)  # before the body is even read
        body = schema.parse_body(await read_body(request, self.config.max_body_bytes))
        req = schema.parse_request(
            body, kind, default_max_tokens=self.config.default_max_tokens,
            max_tokens_limit=self.config.max_tokens_limit, limits=self.swarm.config.limits,
        )
        model = self.check_model(req.model)
        prompt_tokens = await self.prompt_tokens(req)
        hold, max_cost = (None, None) if key is None else await self.reserve(key, req, prompt_tokens)
        record = self.requests.start(RequestRecord(
            id=schema.new_id(kind), kind=kind, stream=req.stream, created=time.time(),
            user=req.user, key_id=key.key_id if key else None,
            limits={k: v for k, v in vars(req.limits).items() if v is not None},
        ))
        run = Run(self, req, max_cost, hold, record)
        try:
            first = await run.open()
        except BaseException as failure:
            await run.close(failure)
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
                                                   run.result()))

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
            result = run.result()
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
        """Close the key store (the caller owns the swarm client)."""
        self.keys.close()

    # ---------------------------------------------------------------- views of the swarm

    async def refresh(self) -> None:
        """Re-read the swarm's records when stale; a slow or failing DHT keeps the old ones."""
        try:
            await asyncio.wait_for(self.swarm.refresh(), REFRESH_TIMEOUT_S)
        except (LayerchainError, OSError, asyncio.TimeoutError) as error:
            log.warning("could not refresh the swarm's records: %s", error)

    def health_json(self) -> dict[str, Any]:
        state = self.swarm.state()
        covered = state.covered and state.usable
        return {"status": "ok" if covered else "degraded", "model": self.spec.name,
                "nodes": len(state.nodes), "covered": covered}

    def swarm_json(self, viewer: ApiKey | None) -> dict[str, Any]:
        """The dashboard's JSON. With keys on, ``viewer`` (the caller's key) sees only its
        own requests and totals, unless it is an admin key."""
        state, spec = self.swarm.state(), self.spec
        everything = viewer is None or viewer.admin
        mine = None if everything else viewer.key_id  # type: ignore[union-attr]
        return {
            "model": {"name": spec.name, "model_id": spec.model_id, "num_blocks": spec.num_blocks},
            "nodes": nodes_json(state.nodes),
            "coverage": list(state.coverage),
            "covered": state.covered,
            "requests": self.requests.recent(key_id=mine),
            "totals": self.requests.totals_of(key_id=mine),
            "keys_required": self.keys_required(),
            "viewer": None if viewer is None else {"key_id": viewer.key_id, "admin": viewer.admin},
            "limits": {"alpha": state.limits.alpha, "max_price": state.limits.max_price,
                       "max_latency_ms": state.limits.max_latency_ms},
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def refresh_catalog(self) -> None:
        """Re-read the swarm's catalog when older than ``CATALOG_TTL_S``; a slow or failing
        DHT keeps the last listing (a discovery without a catalog lists nothing)."""
        discovery = self.swarm.discovery
        if time.monotonic() - self._catalog_read_at < CATALOG_TTL_S \
                or not isinstance(discovery, CatalogDiscovery):
            return
        self._catalog_read_at = time.monotonic()
        try:
            self.catalog = await asyncio.wait_for(list_models(discovery), REFRESH_TIMEOUT_S)
        except (LayerchainError, OSError, asyncio.TimeoutError) as error:
            log.warning("could not read the swarm's catalog: %s", error)

    def models_json(self) -> dict[str, Any]:
        """OpenAI's model list: this gateway's model first (``available``: it serves it),
        then every other model the swarm's catalog lists, ``available: false`` (served by
        the swarm, not through this gateway), ``id`` its name unless another row has it
        (then its model id); ``layerchain`` holds the catalog's row (``models --json``)."""
        own = self.model_json()
        rows, taken = [own], {own["id"].lower()}
        for entry in self.catalog:
            if entry.model_id == self.spec.model_id:
                own["layerchain"].update(entry.to_json())
                continue
            name = entry.name if entry.name.lower() not in taken else entry.model_id
            taken.add(name.lower())
            rows.append({"id": name, "object": "model", "created": int(self.started),
                         "owned_by": "layerchain", "available": False,
                         "layerchain": entry.to_json()})
        return {"object": "list", "data": rows}

    def find_model_json(self, name: str) -> dict[str, Any]:
        """The ``/v1/models`` row of ``name``: this gateway's model (any of its names), else a
        catalog row by its id or model id; UnknownModel (404) if none."""
        own, *others = self.models_json()["data"]
        try:
            self.check_model(name)
        except UnknownModel:
            for row in others:
                if name.lower() in (row["id"].lower(), row["layerchain"]["model_id"]):
                    return dict(row)
            raise
        return dict(own)

    def model_json(self) -> dict[str, Any]:
        return {
            "id": self.spec.name, "object": "model", "created": int(self.started),
            "owned_by": "layerchain", "available": True,
            "layerchain": {"model_id": self.spec.model_id, "num_blocks": self.spec.num_blocks,
                           "family": self.spec.family},
        }


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its body generator when the response ends, however
    it ends. Starlette leaves a generator whose caller hung up suspended at its ``yield``
    until the garbage collector finds it, so the sessions and the accounting in its
    ``finally`` would wait for an unknown time (or for the event loop's shutdown)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


class Run:
    """One request's generation through the swarm, with its clean-up and its accounting."""

    def __init__(self, gateway: Gateway, req: GenerationRequest, max_cost: int | None,
                 hold: Hold | None, record: RequestRecord) -> None:
        self.gateway, self.req, self.hold, self.record = gateway, req, hold, record
        self.max_cost = max_cost  # credits held on the caller's key (None: no key, no cap)
        self._gen: Generation | None = None
        self._closed = False

    async def open(self) -> TokenEvent | None:
        """Start the generation and wait for its first token (errors show up here, before
        any byte of the response is sent, so they get their proper status)."""
        self._gen = self.gateway.swarm.generate_stream(
            _prompt_of(self.req), self.req.params, raw=self.req.raw, limits=self.req.limits,
            max_cost=self.max_cost,
        )
        try:
            return await self._gen.__anext__()
        except StopAsyncIteration:
            return None

    async def rest(self) -> AsyncIterator[TokenEvent]:
        assert self._gen is not None
        async for event in self._gen:
            yield event

    def result(self) -> Any:
        """The generation's result (once it ended)."""
        assert self._gen is not None
        return self._gen.result

    async def close(self, error: BaseException | None) -> None:
        """Close the sessions, log the request and settle the key's hold. Shielded: a caller
        that went away cancels the response, but the nodes' sessions must still be closed
        and the credits settled."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            result = None
            if self._gen is not None:
                await self._gen.aclose()
                result = self._gen.result if self._gen.done else None
            gw = self.gateway
            if self.hold is not None:
                # what the swarm charged, even for a request that failed or was abandoned
                # part way (the peers were paid for every token they computed), at most
                # what was held
                cost = result.cost if result is not None else 0
                served = result is not None and (cost > 0 or result.finish_reason != "cancelled")
                if cost > self.hold.amount:
                    log.warning("request %s cost %s credits, %s more than its key held: the "
                                "operator pays the difference", self.record.id, cost,
                                cost - self.hold.amount)
                try:
                    await asyncio.to_thread(gw.keys.settle, self.hold, cost, served=served)
                except LayerchainError as e:
                    log.error("could not settle %s credits on %s: %s", cost, self.hold.key_id, e)
            if result is not None and result.finish_reason != "cancelled":
                gw.requests.finish(self.record, result)
            elif isinstance(error, LayerchainError):
                gw.requests.fail(self.record, api_error_for(error).message)
            elif isinstance(error, ApiError):
                gw.requests.fail(self.record, error.message)
            elif error is None or isinstance(error, (asyncio.CancelledError, GeneratorExit)):
                gw.requests.fail(self.record, "the caller went away", status="cancelled")
            else:
                gw.requests.fail(self.record, f"internal error: {type(error).__name__}")


def create_app(config: GatewayConfig, swarm: AsyncSwarm) -> FastAPI:
    """The gateway's app around a ready swarm client (which the caller owns and closes)."""
    gateway = Gateway(config, swarm)
    app = FastAPI(title="layerchain gateway", version="1", docs_url=None, redoc_url=None,
                  openapi_url=None)  # served below, behind the key check
    app.state.gateway = gateway
    app.add_middleware(BrowserGuard, policy=gateway.policy)

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
        await gateway.authenticate(request)
        await gateway.refresh_catalog()
        return gateway.models_json()

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> dict:
        await gateway.authenticate(request)
        await gateway.refresh_catalog()
        return gateway.find_model_json(model)

    @app.get("/health")
    async def health() -> dict:
        await gateway.refresh()
        return gateway.health_json()

    @app.get("/api/swarm")
    async def swarm_state(request: Request) -> dict:
        viewer = await gateway.authenticate(request)
        await gateway.refresh()
        return gateway.swarm_json(viewer)

    @app.get("/api/train/jobs")
    async def train_jobs(request: Request) -> dict:
        """This machine's training job records (``layerchain train status --json``)."""
        from layerchain.train.jobs import JobStore

        await gateway.authenticate(request)
        records = await asyncio.to_thread(JobStore().list)
        return {"jobs": [record.to_json() for record in records]}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        await gateway.authenticate(request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        await gateway.authenticate(request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="layerchain gateway")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
