"""The gateway against hostile callers and hostile peers (issue 12, items 16-19 and 4):
no overdraft under concurrency, keys that fail closed, no cross-site or DNS-rebinding use
from a browser, bounded work per request, and no peer-sent error shown as the caller's
401/402. In-process: memory transport and discovery, a tiny model, httpx over ASGI.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from gateway_harness import memory_gateway
from typer.testing import CliRunner

from layerchain.cli.main import app as cli_app
from layerchain.client.config import RouteLimits
from layerchain.client.state import NodeState, SwarmState
from layerchain.errors import ConfigError, InsufficientFunds, InvalidApiKey
from layerchain.gateway import GatewayConfig, KeyStore
from layerchain.gateway.app import keys_on_at_start
from layerchain.gateway.billing import price_cap, reservation
from layerchain.gateway.guard import BrowserPolicy, check
from layerchain.model import encode_prompt, load_tokenizer, resolve_model
from layerchain.node import Node
from layerchain.wire import messages as m

PROMPT = "What is the capital of France?"
CHAT = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "temperature": 0}
PRICE = 3  # credits per block per token, on both nodes (4 blocks: 12 credits per token)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", tokenizer=True))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_prompt_tokens(model: str) -> int:
    return len(encode_prompt(load_tokenizer(resolve_model(model)), CHAT["messages"]))


# ---------------------------------------------------------------------------- 16: no overdraft


def test_reservation_is_every_position_at_the_price_cap():
    node = NodeState("p", 0, 4, "mem://p", 1.0, 5, 100, "", "1", None, False)
    dear = NodeState("q", 2, 4, "mem://q", 1.0, 9, 100, "", "1", None, False)
    banned = NodeState("r", 0, 4, "mem://r", 1.0, 1000, 100, "", "1", None, True)
    state = SwarmState("m", 4, (node, dear, banned), (2, 2, 3, 3), RouteLimits())
    assert state.max_route_price() == 5 + 5 + 9 + 9  # the dearest unbanned node per block
    assert price_cap(None, state) == 28 and price_cap(2.5, state) == 2.5
    assert price_cap(1e9, state) == 28  # no route the planner can pick now costs more
    cheap = SwarmState("m", 4, (node,), (1,) * 4, RouteLimits(max_price=7))
    assert price_cap(None, cheap) == 7 and price_cap(8, cheap) == 8
    gap = SwarmState("m", 5, (node,), (1, 1, 1, 1, 0), RouteLimits())
    assert price_cap(None, gap) == float("inf") and not gap.usable
    assert reservation(10, 4, 12) == (10 + 4 - 1) * 12
    assert reservation(10, 4, 0.5) == 7 and reservation(10, 4, 0) == 0


def test_concurrent_requests_cannot_overdraw_a_key(tiny_model, tmp_path):
    """20 requests at once on a key that covers two: two are served, 18 get 402, and the
    balance never goes below zero (it was -99,999 with 20 served)."""
    one = reservation(chat_prompt_tokens(tiny_model), CHAT["max_tokens"], 4 * PRICE)
    store = KeyStore(tmp_path / "keys.sqlite")
    key, rec = store.create("acme", balance=2 * one + one // 2)
    tiny_key, tiny = store.create("one credit", balance=1)

    async def main():
        async with memory_gateway(tiny_model, tmp_path, price=PRICE) as (client, _):
            many = await asyncio.gather(*(
                client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
                for _ in range(20)))
            one_credit = await client.post("/v1/chat/completions", json=CHAT,
                                           headers=bearer(tiny_key))
            return many, one_credit

    many, one_credit = run(main())
    ok = [r for r in many if r.status_code == 200]
    refused = [r for r in many if r.status_code != 200]
    assert len(ok) == 2, [r.text for r in many]
    assert all(r.status_code == 402 for r in refused)
    assert {r.json()["error"]["code"] for r in refused} == {"insufficient_balance"}
    assert "may cost up to" in refused[0].json()["error"]["message"]
    charged = sum(r.json()["layerchain"]["cost"] for r in ok)
    after = store.get(rec.key_id)
    assert (after.balance, after.held, after.spent, after.requests) == (
        2 * one + one // 2 - charged, 0, charged, 2)
    assert after.balance >= 0
    assert one_credit.status_code == 402 and store.get(tiny.key_id).balance == 1


# ---------------------------------------------------------------------------- 17: fail closed


def test_a_named_missing_or_unreadable_key_store_is_a_start_up_error(tmp_path):
    missing = GatewayConfig(keys_path=tmp_path / "nowhere.sqlite")
    with pytest.raises(ConfigError, match="no API-key store"):
        keys_on_at_start(missing, KeyStore(missing.keys_file))
    (tmp_path / "gateway-keys.sqlite").write_bytes(b"not a database " * 100)
    garbled = GatewayConfig(data_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot read the key store"):
        keys_on_at_start(garbled, KeyStore(garbled.keys_file))
    fresh = GatewayConfig(data_dir=tmp_path / "new")
    assert keys_on_at_start(fresh, KeyStore(fresh.keys_file)) is False  # nothing named: open
    required = GatewayConfig(data_dir=tmp_path / "new", require_keys=True)
    assert keys_on_at_start(required, KeyStore(required.keys_file)) is True
    # the CLI says so in one line, before it joins any swarm
    done = CliRunner().invoke(cli_app, ["api", "serve", "--initial-peers", "/ip4/127.0.0.1/tcp/1",
                                        "--keys", str(tmp_path / "nowhere.sqlite")])
    assert done.exit_code == 1 and "no API-key store" in done.output
    assert done.output.strip().count("\n") == 0


def test_keys_stay_on_when_the_store_goes_away_or_breaks(tiny_model, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, _ = store.create("acme", balance=100_000)

    async def main():
        async with memory_gateway(tiny_model, tmp_path, price=PRICE) as (client, _):
            before = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            store.path.rename(tmp_path / "moved.sqlite")
            gone = await client.post("/v1/chat/completions", json=CHAT)
            gone_keyed = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            store.path.write_bytes(b"garbage " * 512)
            broken = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            return before, gone, gone_keyed, broken

    before, gone, gone_keyed, broken = run(main())
    assert before.status_code == 200
    assert gone.status_code == 401 and gone_keyed.status_code == 401  # not an open gateway
    assert broken.status_code == 503 and broken.json()["error"]["code"] == "key_store_unavailable"


def test_an_open_gateway_whose_store_turns_unreadable_closes(tiny_model, tmp_path):
    async def main():
        async with memory_gateway(tiny_model, tmp_path) as (client, gateway):
            open_ = await client.post("/v1/chat/completions", json=CHAT)
            gateway.keys.path.write_bytes(b"garbage " * 512)  # data_dir/gateway-keys.sqlite
            broken = await client.post("/v1/chat/completions", json=CHAT)
            gateway.keys.path.unlink()
            after = await client.post("/v1/chat/completions", json=CHAT)
            return open_, broken, after

    open_, broken, after = run(main())
    assert open_.status_code == 200
    assert broken.status_code == 503 and after.status_code == 401


def test_swarm_view_and_docs_need_a_key_and_show_only_the_callers_requests(tiny_model, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    alice, a = store.create("alice", balance=100_000)
    bob, b = store.create("bob", balance=100_000)
    admin, _ = store.create("operator", balance=0, admin=True)

    async def main():
        async with memory_gateway(tiny_model, tmp_path, price=PRICE) as (client, _):
            for key, user in ((alice, "alice-user"), (bob, "bob-user")):
                r = await client.post("/v1/chat/completions", json={**CHAT, "user": user},
                                      headers=bearer(key))
                assert r.status_code == 200, r.text
            return {
                "anonymous": await client.get("/api/swarm"),
                "docs": await client.get("/docs"),
                "openapi": await client.get("/openapi.json"),
                "docs_keyed": await client.get("/docs", headers=bearer(alice)),
                "openapi_keyed": await client.get("/openapi.json", headers=bearer(alice)),
                "alice": await client.get("/api/swarm", headers=bearer(alice)),
                "admin": await client.get("/api/swarm", headers=bearer(admin)),
                "health": await client.get("/health"),
                "page": await client.get("/"),
            }

    r = run(main())
    for name in ("anonymous", "docs", "openapi"):
        assert r[name].status_code == 401, name
    assert r["docs_keyed"].status_code == 200 and r["openapi_keyed"].json()["paths"]
    seen = r["alice"].json()
    assert [(q["key_id"], q["user"]) for q in seen["requests"]] == [(a.key_id, "alice-user")]
    assert b.key_id not in r["alice"].text and "bob-user" not in r["alice"].text
    assert seen["totals"]["requests"] == 1 and seen["viewer"] == {"key_id": a.key_id, "admin": False}
    assert len(seen["nodes"]) == 2 and seen["covered"]
    everyone = r["admin"].json()
    assert {q["key_id"] for q in everyone["requests"]} == {a.key_id, b.key_id}
    assert everyone["totals"]["requests"] == 2
    assert r["health"].status_code == 200 and r["page"].status_code == 200  # no user data there


# ---------------------------------------------------------------------------- 18: browsers


def test_browser_checks_pure():
    policy = BrowserPolicy.of(hosts=["gw.example"], origins=["https://app.example"])

    def status(method="POST", scheme="http", **headers):
        headers = {k.replace("_", "-"): v for k, v in headers.items()}
        headers.setdefault("content-type", "application/json")
        refused = check(method, scheme, headers, policy)
        return None if refused is None else (refused.status, refused.code)

    assert status(host="127.0.0.1:8000") is None  # curl, the openai client
    assert status(host="localhost:8000", origin="http://localhost:8000") is None  # the dashboard
    assert status(host="[::1]:8000") is None and status(host="gw.example") is None
    assert status(host="127.0.0.1:8000", origin="https://app.example") is None
    assert status(host="evil.example:8000") == (403, "host_not_allowed")  # DNS rebinding
    assert status(host="evil.example:8000", origin="http://evil.example:8000") == (
        403, "host_not_allowed")
    assert status(host="127.0.0.1:8000", origin="http://evil.example") == (403, "origin_not_allowed")
    assert status(host="127.0.0.1:8000", origin="null") == (403, "origin_not_allowed")
    assert status(host="127.0.0.1:8000", origin="http://127.0.0.1:9999") == (
        403, "origin_not_allowed")  # another local app's page
    for form in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x", ""):
        assert status(host="127.0.0.1:8000", content_type=form) == (415, "unsupported_media_type")
    assert status(host="127.0.0.1:8000", content_type="application/json; charset=utf-8") is None
    assert status("GET", host="127.0.0.1", content_type="") is None
    anything = BrowserPolicy.of(hosts=["*"])
    assert check("GET", "http", {"host": "whatever.example"}, anything) is None


def test_a_web_page_cannot_spend_the_gateways_wallet(tiny_model, tmp_path):
    """What a page on another site can make a browser send to 127.0.0.1: a form POST
    (text/plain, no preflight), a fetch with its Origin, a rebound DNS name. All refused
    before the swarm is touched; the dashboard's own same-origin fetch works."""
    body = json.dumps({**CHAT, "prompt": "x"})

    async def main():
        async with memory_gateway(tiny_model, tmp_path) as (client, gateway):
            replies = {
                "form": await client.post("/v1/completions", content=body,
                                          headers={"Content-Type": "text/plain",
                                                   "Origin": "http://evil.example"}),
                "form_no_origin": await client.post("/v1/completions", content=body,
                                                    headers={"Content-Type": "text/plain"}),
                "fetch": await client.post("/v1/chat/completions", json=CHAT,
                                           headers={"Origin": "http://evil.example"}),
                "rebound": await client.post("/v1/chat/completions", json=CHAT,
                                             headers={"Host": "evil.example:8000",
                                                      "Origin": "http://evil.example:8000"}),
                "rebound_read": await client.get("/api/swarm", headers={"Host": "evil.example:8000"}),
                "dashboard": await client.post("/v1/chat/completions", json=CHAT,
                                               headers={"Origin": "http://127.0.0.1:8000"}),
            }
            return replies, gateway.requests.totals_of()

    r, totals = run(main())
    assert r["form"].status_code == 403 and r["form_no_origin"].status_code == 415
    assert r["fetch"].status_code == 403 and r["rebound"].status_code == 403
    assert r["rebound_read"].status_code == 403
    assert "access-control-allow-origin" not in r["fetch"].headers
    assert r["dashboard"].status_code == 200, r["dashboard"].text
    assert totals["requests"] == 1  # only the dashboard's request reached the swarm


# ---------------------------------------------------------------------------- 19: bounded work


@pytest.mark.parametrize("fields, param", [
    ({"seed": 2**70}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"stop": "x" * 257}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 2}, "n"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"top_k": 2**40}, "top_k"),
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"user": "u" * 1000}, "user"),
    ({"messages": [{"role": "user", "content": "hi"}] * 2000}, "messages"),
])
def test_unbounded_fields_get_a_400_naming_them(tiny_model, tmp_path, fields, param):
    async def main():
        async with memory_gateway(tiny_model, tmp_path) as (client, _):
            return await client.post("/v1/chat/completions", json={**CHAT, **fields})

    reply = run(main())
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_non_finite_numbers_long_prompts_and_big_bodies(tiny_model, tmp_path):
    async def main():
        async with memory_gateway(tiny_model, tmp_path, max_body_bytes=64 * 1024) as (client, _):
            raw = json.dumps(CHAT)[:-1]
            replies = {}
            for name, value in (("nan", "NaN"), ("inf", "Infinity"), ("ninf", "-Infinity")):
                replies[name] = await client.post(
                    "/v1/chat/completions", content=f'{raw}, "temperature": {value}}}',
                    headers={"Content-Type": "application/json"})
            # the tiny model's context is 256 tokens
            replies["context"] = await client.post("/v1/completions", json={
                "prompt": "word " * 300, "max_tokens": 4})
            replies["chars"] = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "y" * 3000}], "max_tokens": 4})
            replies["body"] = await client.post("/v1/completions", json={
                "prompt": "x" * 100_000, "max_tokens": 4})
            replies["ok"] = await client.post("/v1/completions", json={
                "prompt": "word " * 200, "max_tokens": 4, "temperature": 0})
            return replies

    r = run(main())
    for name in ("nan", "inf", "ninf"):
        assert r[name].status_code == 400, (name, r[name].text)
    assert r["context"].status_code == 400
    assert r["context"].json()["error"]["param"] == "prompt"
    assert "context" in r["context"].json()["error"]["message"]
    # more characters than 8 per token of context: refused before it is tokenized
    assert r["chars"].status_code == 400 and "characters" in r["chars"].json()["error"]["message"]
    assert r["chars"].json()["error"]["param"] == "messages"
    assert r["body"].status_code == 413
    assert r["ok"].status_code == 200, r["ok"].text


# ---------------------------------------------------------------------------- 4: peers' errors


class LyingNode(Node):
    """Answers every step with an error code that means something only to the gateway."""

    code: type = InvalidApiKey

    async def handle(self, msg, owner: int = 0):
        if isinstance(msg, m.Step):
            raise self.code("your API key is invalid" if self.code is InvalidApiKey
                            else "your balance is empty")
        return await super().handle(msg, owner)


class BrokeLyingNode(LyingNode):
    code = InsufficientFunds


@pytest.mark.parametrize("node_class", [LyingNode, BrokeLyingNode])
def test_a_peers_error_code_is_never_the_callers_401_or_402(tiny_model, tmp_path, node_class):
    store = KeyStore(tmp_path / "keys.sqlite")
    key, rec = store.create("acme", balance=100_000)

    async def main():
        async with memory_gateway(tiny_model, tmp_path, node_class=node_class) as (client, _):
            whole = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True},
                                         headers=bearer(key))
            return whole, streamed

    whole, streamed = run(main())
    for reply in (whole, streamed):
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["type"] == "server_error"
    assert store.get(rec.key_id).balance == 100_000 and store.get(rec.key_id).held == 0


# ---------------------------------------------------------------------------- issue 19.4


def test_the_gateway_reads_the_swarm_through_its_snapshot(tiny_model, tmp_path):
    async def main():
        async with memory_gateway(tiny_model, tmp_path, price=PRICE) as (client, gateway):
            view = (await client.get("/api/swarm")).json()
            return view, gateway.swarm.state()

    view, state = run(main())
    assert isinstance(state, SwarmState) and state.usable and state.coverage == (1, 1, 1, 1)
    assert [(n.start, n.end, n.price_per_block) for n in state.nodes] == [(0, 2, 3), (2, 4, 3)]
    assert state.max_route_price() == 4 * PRICE
    # the default cap the planner applies when a request gives none: 4x the median route price
    assert state.limits.max_price == 4 * 4 * PRICE
    assert [(n["peer_id"], n["banned"]) for n in view["nodes"]] == [
        (n.peer_id, n.banned) for n in state.nodes]
    assert view["coverage"] == list(state.coverage)
    with pytest.raises(AttributeError):  # frozen: a reader cannot change the client's view
        state.nodes[0].banned = True  # type: ignore[misc]
