"""The gateway without processes: request parsing, error mapping, the key store, the `api keys`
commands, and the HTTP app over an in-process swarm (memory transport and discovery, a tiny
real model), called through httpx's ASGI transport. The real thing (uvicorn, node
processes, the official openai client, a browser) is tests/test_gateway_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3

import pytest
from typer.testing import CliRunner

from gateway_harness import memory_gateway
from layerchain.cli.main import app as cli_app
from layerchain.errors import (
    ConfigError,
    InsufficientFunds,
    InvalidApiKey,
    NoRoute,
    PeerTimeout,
    SpanError,
    UnknownModel,
)
from layerchain.gateway import KeyStore
from layerchain.gateway.app import STATIC_DIR
from layerchain.gateway.schema import api_error_for, key_error, parse_request
from layerchain.model import load_tokenizer, resolve_model
from layerchain.routing import RouteLimits

PROMPT = "What is the capital of France?"


def parse(body: dict, kind: str = "chat"):
    return parse_request(body, kind, default_max_tokens=16, max_tokens_limit=64)


# ---------------------------------------------------------------------------- request parsing


def test_chat_request_fields_and_defaults():
    req = parse({
        "model": "smollm2", "max_tokens": 8, "temperature": 0, "top_p": 0.9, "seed": 7,
        "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
        "alpha": 0.5, "max_price": 3, "max_latency_ms": 250,
        "messages": [{"role": "developer", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                  {"type": "text", "text": "there"}]}],
        "presence_penalty": 0.3,  # a standard field we do not use: ignored, not refused
    })
    assert req.prompt == ({"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi there"})
    p = req.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.seed, p.stop) == (8, 0.0, 0.9, 7, ("\n",))
    assert req.stream and req.include_usage and req.user == "u1" and not req.raw
    assert (req.limits.alpha, req.limits.max_price, req.limits.max_latency_ms) == (0.5, 3, 250)

    text = parse({"prompt": ["Once upon"], "max_completion_tokens": 4}, "text")
    assert text.prompt == "Once upon" and text.raw and text.params.max_new_tokens == 4
    assert text.params.temperature == 1.0  # OpenAI's default when absent
    assert parse({"prompt": "x"}, "text").params.max_new_tokens == 16  # the gateway's default
    assert parse({"prompt": "x"}, "text").limits == RouteLimits()  # the gateway's defaults
    defaults = RouteLimits(alpha=0.25, max_price=9.0)
    own = parse_request({"prompt": "x", "max_price": 2}, "text", default_max_tokens=16,
                        max_tokens_limit=64, limits=defaults)
    assert own.limits == RouteLimits(alpha=0.25, max_price=2.0)  # field by field


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "  "}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": True}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "alpha": 1.5}, "alpha"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_latency_ms": 0}, "max_latency_ms"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": 3}, "model"),
])
def test_bad_chat_fields_name_the_param(body, param):
    with pytest.raises(ConfigError) as caught:
        parse(body)
    assert caught.value.param == param
    assert api_error_for(caught.value).to_json()["error"]["param"] == param


def test_bad_prompts():
    for body in ({}, {"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": 5}):
        with pytest.raises(ConfigError) as caught:
            parse(body, "text")
        assert caught.value.param == "prompt"


@pytest.mark.parametrize("error, status, code", [
    (ConfigError("x"), 400, "config_error"),
    (SpanError("x"), 400, "span_error"),
    (UnknownModel("x"), 404, "model_not_found"),
    (NoRoute("x"), 503, "no_route"),
    (PeerTimeout("x"), 503, "peer_timeout"),
    # from a generation these are the swarm's or the gateway wallet's, never the caller's key
    (InvalidApiKey("x"), 503, "invalid_api_key"),
    (InsufficientFunds("x"), 503, "insufficient_funds"),
])
def test_errors_map_to_openai_statuses(error, status, code):
    api = api_error_for(error)
    body = api.to_json()["error"]
    assert (api.status, body["code"]) == (status, code)
    assert set(body) == {"message", "type", "param", "code"} and body["message"]


def test_only_the_gateways_key_checks_answer_401_and_402():
    assert (key_error(InvalidApiKey("x")).status, key_error(InvalidApiKey("x")).code) == (
        401, "invalid_api_key")
    assert (key_error(InsufficientFunds("x")).status, key_error(InsufficientFunds("x")).code) == (
        402, "insufficient_balance")


# ---------------------------------------------------------------------------- key store


def test_key_store_lifecycle(tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    assert not store.enabled() and store.list() == []
    key, rec = store.create("alice", balance=10)
    assert key.startswith("lc-") and len(key) > 40 and rec.key_id.startswith("key_")
    assert store.enabled()
    raw = (tmp_path / "keys.sqlite").read_bytes()
    assert key.encode() not in raw  # only the hash is stored
    assert store.authenticate(key).key_id == rec.key_id
    assert store.authenticate(key).balance == 10 and not rec.admin
    for bad_key in (None, "", "lc-nope", key + "x"):
        with pytest.raises(InvalidApiKey):
            store.authenticate(bad_key)
    hold = store.reserve(rec.key_id, 8)
    assert (store.get(rec.key_id).held, store.get(rec.key_id).available) == (8, 2)
    with pytest.raises(InsufficientFunds):  # 2 left: the held credits cannot be reserved again
        store.reserve(rec.key_id, 3)
    after = store.settle(hold, 25)  # charged at most what was held: never below zero
    assert (after.balance, after.held, after.spent, after.requests) == (2, 0, 8, 1)
    after = store.settle(store.reserve(rec.key_id, 2), 1, served=False)
    assert (after.balance, after.held, after.spent, after.requests) == (1, 0, 9, 1)
    store.settle(store.reserve(rec.key_id, 1), 1)
    with pytest.raises(InsufficientFunds):  # nothing left: even a free request is refused
        store.reserve(rec.key_id, 0)
    assert store.topup(rec.key_id, 20).balance == 20
    assert store.reserve(rec.key_id, 20).amount == 20
    store.revoke(rec.key_id)
    with pytest.raises(InvalidApiKey, match="revoked"):
        store.authenticate(key)
    with pytest.raises(InvalidApiKey):
        store.reserve(rec.key_id, 0)
    assert store.enabled()  # a revoked last key keeps the gateway closed
    with pytest.raises(ConfigError):
        store.topup(rec.key_id, 0)
    with pytest.raises(ConfigError):
        store.revoke("key_00000000")
    with pytest.raises(ConfigError):
        store.create("bob", balance=-1)


def test_api_keys_commands(tmp_path):
    runner = CliRunner()
    args = ["--data-dir", str(tmp_path)]

    def cli(*argv):
        return runner.invoke(cli_app, ["api", "keys", *argv, *args])

    done = cli("create", "--name", "acme", "--balance", "500", "--json")
    assert done.exit_code == 0, done.output
    created = json.loads(done.output)
    assert created["key"].startswith("lc-") and created["balance"] == 500
    key_id = created["key_id"]
    assert (tmp_path / "gateway-keys.sqlite").exists()
    assert json.loads(cli("topup", key_id, "250", "--json").output)["balance"] == 750
    assert json.loads(cli("revoke", key_id, "--json").output)["revoked"] is True
    rows = json.loads(cli("list", "--json").output)["keys"]
    assert [(r["key_id"], r["name"], r["balance"], r["revoked"]) for r in rows] == [
        (key_id, "acme", 750, True)]
    assert created["key"] not in cli("list").output
    admin = json.loads(cli("create", "--name", "ops", "--admin", "--json").output)
    assert admin["admin"] is True and admin["held"] == 0 and created["admin"] is False
    assert "admin" in cli("list").output
    bad = cli("topup", "key_nothere", "5")
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "no API key" in bad.output


# ---------------------------------------------------------------------------- the app, in-process


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def events(body: str) -> list:
    """The data of each server-sent event; "[DONE]" stays a string."""
    out = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_whole_and_streamed_agree(tiny_model, tmp_path):
    chat = {"model": tiny_model, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 8, "temperature": 0}

    async def main():
        async with memory_gateway(tiny_model, tmp_path) as (client, _):
            whole = await client.post("/v1/chat/completions", json=chat)
            streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
            with_usage = await client.post("/v1/chat/completions", json={
                **chat, "stream": True, "stream_options": {"include_usage": True}})
            text = await client.post("/v1/completions", json={
                "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "stream": True})
            state = (await client.get("/api/swarm")).json()
            return whole, streamed, with_usage, text, state

    whole, streamed, with_usage, text, state = run(main())
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    answer = body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert [(h["start"], h["end"]) for h in body["layerchain"]["route"]] == [(0, 2), (2, 4)]

    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = events(streamed.text)
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == answer  # greedy
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == usage  # usage in every response: here on the last chunk

    more = events(with_usage.text)[:-1]
    assert more[-1]["choices"] == [] and more[-1]["usage"] == usage
    assert "usage" not in more[-2] and more[-2]["choices"][0]["finish_reason"]

    parts = events(text.text)[:-1]
    assert all(c["object"] == "text_completion" for c in parts)
    assert parts[-1]["usage"]["completion_tokens"] >= 1

    assert len(state["nodes"]) == 2 and state["covered"] and state["coverage"] == [1, 1, 1, 1]
    assert [r["status"] for r in state["requests"]] == ["done"] * 4
    assert state["totals"]["requests"] == 4 and not state["keys_required"]


def test_keys_gate_and_debit_what_the_swarm_charged(tiny_model, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, rec = store.create("acme", balance=100_000)
    empty_key, _ = store.create("broke", balance=0)
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0}

    async def main():
        async with memory_gateway(tiny_model, tmp_path, price=3) as (client, _):
            auth = {"Authorization": f"Bearer {key}"}
            replies = {
                "missing": await client.post("/v1/chat/completions", json=chat),
                "bad": await client.post("/v1/chat/completions", json=chat,
                                         headers={"Authorization": "Bearer lc-wrong"}),
                "broke": await client.post("/v1/chat/completions", json=chat,
                                           headers={"Authorization": f"Bearer {empty_key}"}),
                "models_no_key": await client.get("/v1/models"),
                "ok": await client.post("/v1/chat/completions", json=chat, headers=auth),
                "stream": await client.post("/v1/chat/completions", json={**chat, "stream": True},
                                            headers=auth),
                "too_cheap": await client.post("/v1/chat/completions",
                                               json={**chat, "max_price": 0}, headers=auth),
                "models": await client.get("/v1/models", headers=auth),
            }
            return replies

    r = run(main())
    assert r["missing"].status_code == 401
    assert r["missing"].json()["error"]["code"] == "invalid_api_key"
    assert r["bad"].status_code == 401 and r["models_no_key"].status_code == 401
    assert r["broke"].status_code == 402
    assert r["broke"].json()["error"]["code"] == "insufficient_balance"
    assert r["ok"].status_code == 200 and r["models"].status_code == 200
    ok = r["ok"].json()
    cost = ok["layerchain"]["cost"]
    # every token position through all 4 blocks at 3 credits per block per token
    tokens = ok["usage"]["prompt_tokens"] + ok["usage"]["completion_tokens"] - 1
    assert cost == tokens * 4 * 3
    streamed_cost = events(r["stream"].text)[-2]["layerchain"]["cost"]
    assert streamed_cost == cost  # same request, same charge
    assert r["too_cheap"].status_code == 503
    assert r["too_cheap"].json()["error"]["code"] == "no_route"
    after = store.get(rec.key_id)
    assert (after.balance, after.spent, after.requests) == (100_000 - 2 * cost, 2 * cost, 2)


async def abandon_stream(app, path: str, body: dict, headers: dict[str, str]) -> bytes:
    """POST a streamed request straight to the ASGI app and hang up after its first chunk
    (what a caller closing its connection looks like to the server)."""
    first_chunk = asyncio.Event()
    request_sent = False
    received = bytearray()

    async def receive():
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await first_chunk.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            received.extend(message["body"])
            first_chunk.set()
            await asyncio.sleep(0.5)  # a stalled socket: the disconnect wins the race

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "server": ("gw", 80), "client": ("127.0.0.1", 1),
        "headers": [(b"content-type", b"application/json")]
        + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    await app(scope, receive, send)
    return bytes(received)


def test_an_abandoned_stream_is_debited_for_what_it_computed(tiny_model, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, rec = store.create("acme", balance=100_000)
    chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64,
            "temperature": 0, "stream": True}

    async def main():
        async with memory_gateway(tiny_model, tmp_path, price=3) as (client, gateway):
            app = client._transport.app
            got = await abandon_stream(app, "/v1/chat/completions", chat,
                                       {"Authorization": f"Bearer {key}"})
            for _ in range(100):  # the clean-up runs after the app returns
                if gateway.requests.recent()[0]["status"] != "running":
                    break
                await asyncio.sleep(0.05)
            return got, gateway.requests.recent()

    got, recent = run(main())
    assert events(got.decode())[0]["object"] == "chat.completion.chunk"  # it had started
    assert recent[0]["status"] == "cancelled"
    after = store.get(rec.key_id)
    prompt_tokens = len(load_tokenizer(resolve_model(tiny_model)).apply_chat_template(
        chat["messages"], add_generation_prompt=True))
    # at least the prefill through all 4 blocks at 3 credits, far less than 64 tokens' worth
    assert prompt_tokens * 4 * 3 <= after.spent < (prompt_tokens + 63) * 4 * 3
    assert (after.balance, after.requests) == (100_000 - after.spent, 1)


def test_request_errors_and_per_request_limits(tiny_model, tmp_path):
    async def main():
        async with memory_gateway(tiny_model, tmp_path) as (client, gateway):
            chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
            replies = {
                "model": await client.post("/v1/chat/completions", json={**chat, "model": "gpt-4"}),
                "json": await client.post("/v1/chat/completions", content=b"{not json",
                                          headers={"Content-Type": "application/json"}),
                "field": await client.post("/v1/completions", json={"prompt": ""}),
                "path": await client.get("/v1/nothing"),
                "alpha": await client.post("/v1/chat/completions", json={**chat, "alpha": 1}),
                "alpha2": await client.post("/v1/chat/completions", json={**chat, "alpha": 1}),
                "latency": await client.post("/v1/chat/completions",
                                             json={**chat, "max_latency_ms": 1e-6}),
                "health": await client.get("/health"),
            }
            return replies, gateway.swarm.config

    r, config = run(main())
    assert r["model"].status_code == 404
    assert r["model"].json()["error"] == {
        "message": r["model"].json()["error"]["message"], "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}
    assert r["json"].status_code == 400 and r["field"].status_code == 400
    assert r["field"].json()["error"]["param"] == "prompt"
    assert r["path"].status_code == 404 and "error" in r["path"].json()
    assert r["alpha"].status_code == 200 and r["alpha2"].status_code == 200
    assert r["latency"].status_code == 503 and r["latency"].json()["error"]["code"] == "no_route"
    assert config.limits == RouteLimits()  # the limits were per request
    health = r["health"].json()
    assert (health["status"], health["nodes"], health["covered"]) == ("ok", 2, True)


def test_dashboard_is_self_contained():
    html = (STATIC_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith("/static/"), ref  # nothing from a CDN: the machine is offline
    for name in ("dashboard.js", "dashboard.css"):
        text = (STATIC_DIR / name).read_text()
        assert "http://" not in text and "https://" not in text and "@import" not in text
    js = (STATIC_DIR / "dashboard.js").read_text()
    assert "innerHTML" not in js  # network text goes in with textContent only


def test_static_files_are_package_data():
    """The dashboard ships in the wheel: pyproject lists the static files as package data."""
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["layerchain.gateway"]
    assert any(pattern.startswith("static/") for pattern in data)


def test_key_store_is_plain_sqlite(tmp_path):
    """Operators may inspect the store with sqlite3: one table, hashes, no keys."""
    store = KeyStore(tmp_path / "k.sqlite")
    key, _ = store.create("x", 1)
    with contextlib.closing(sqlite3.connect(tmp_path / "k.sqlite")) as db:
        rows = db.execute("SELECT key_hash, name, balance FROM api_keys").fetchall()
    assert len(rows) == 1 and rows[0][1:] == ("x", 1) and key not in rows[0][0]
