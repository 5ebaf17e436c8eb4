"""End to end: `layerchain api serve` (uvicorn, in its own process) on a real local swarm of 3
node processes serving SmolLM2 at 1 credit per block per token, called with the official
`openai` client and driven in headless Chromium (Debian's `chromium`, through Playwright).

One swarm and one gateway serve the whole module. The gateway has API keys on (keys are
created in its store before it starts), so every call carries a key and every charge is
checked against the key's balance.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from layerchain.gateway import KeyStore
from layerchain.local import LocalProcess, node_env, process_start, stop_pids, swarm_down, swarm_up
from layerchain.types import even_spans

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
TOKENS = 12
PRICE = 1  # credits per block per token, on every node
BLOCKS = 30
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    state = tmp_path_factory.mktemp("gateway-swarm")
    local = swarm_up(state, even_spans(BLOCKS, 3), node_args=[["--price", str(PRICE)]] * 3)
    yield local
    swarm_down(state, quiet=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> KeyStore:
    return KeyStore(tmp_path_factory.mktemp("gateway-data") / "gateway-keys.sqlite")


@pytest.fixture(scope="module")
def keys(store) -> dict[str, tuple[str, str]]:
    """name -> (key, key_id): a funded key, one without credits, a revoked one, a meter."""
    made = {}
    for name, balance in (("main", 10_000_000), ("broke", 0), ("revoked", 1000), ("meter", 50_000)):
        key, record = store.create(name, balance)
        made[name] = (key, record.key_id)
    store.revoke(made["revoked"][1])
    return made


def _wait_for_url(proc: subprocess.Popen, log: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+) ", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        if proc.poll() is not None:
            pytest.fail(f"the gateway exited ({proc.returncode}): {log.read_text()[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"the gateway did not start in {timeout_s} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def gateway(swarm, store, keys):
    """The gateway's base URL; SIGTERM (then SIGKILL) to its process group at the end."""
    log = store.path.parent / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "layerchain", "api", "serve",
             "--initial-peers", swarm.initial_peers[0], "--port", "0",
             "--data-dir", str(store.path.parent), "--max-tokens", str(TOKENS),
             "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=node_env(),
        )
    started = process_start(proc.pid)
    try:
        url = _wait_for_url(proc, log, 120)
        deadline = time.monotonic() + 60
        while not httpx.get(f"{url}/health", timeout=10).json()["covered"]:
            assert time.monotonic() < deadline, "the gateway never saw every block covered"
            time.sleep(0.5)
        yield url
    finally:
        t0 = time.perf_counter()
        proc.terminate()  # SIGTERM: uvicorn drains, the client closes, the process exits 0
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        print(f"gateway stopped in {time.perf_counter() - t0:.1f} s")
        stop_pids([LocalProcess(proc.pid, started)], grace_s=1)  # what is left of its group
    assert proc.returncode == 0, f"SIGTERM did not stop the gateway cleanly: {log.read_text()[-2000:]}"


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def chat(messages_text: str = QUESTION, max_tokens: int = TOKENS, **kw):
    return dict(model="smollm2", messages=[{"role": "user", "content": messages_text}],
                max_tokens=max_tokens, temperature=0, **kw)


def expected_cost(usage) -> int:
    """Every token position but the last sampled one goes through all blocks, at PRICE."""
    return (usage.prompt_tokens + usage.completion_tokens - 1) * BLOCKS * PRICE


def test_models_and_health(gateway, keys):
    api = client(gateway, keys["main"][0])
    assert [m.id for m in api.models.list().data] == ["smollm2"]
    assert api.models.retrieve("smollm2").model_extra["layerchain"]["num_blocks"] == BLOCKS
    assert httpx.get(f"{gateway}/health").json() == {
        "status": "ok", "model": "smollm2", "nodes": 3, "covered": True}


def test_chat_whole_and_streamed(gateway, keys):
    api = client(gateway, keys["main"][0])
    whole = api.chat.completions.create(**chat(user="e2e"))
    answer = whole.choices[0].message.content
    assert "Paris" in answer
    assert whole.object == "chat.completion" and whole.model == "smollm2"
    assert whole.usage.completion_tokens >= 2
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    ext = whole.model_extra["layerchain"]
    assert [(h["start"], h["end"]) for h in ext["route"]] == [(0, 10), (10, 20), (20, 30)]
    assert ext["cost"] == expected_cost(whole.usage) > 0

    chunks = list(api.chat.completions.create(
        **chat(), stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2  # streamed token by token, not in one piece
    assert "".join(deltas) == answer  # greedy: the same answer either way
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completions_whole_and_streamed(gateway, keys):
    api = client(gateway, keys["main"][0])
    params = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 6,
              "temperature": 0}
    whole = api.completions.create(**params)
    assert whole.object == "text_completion" and "Paris" in whole.choices[0].text
    assert whole.usage.prompt_tokens == 5 and whole.usage.completion_tokens == 6
    assert whole.choices[0].finish_reason == "length"
    chunks = list(api.completions.create(**params, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6  # usage on the last chunk when not asked


def test_error_cases(gateway, keys):
    api = client(gateway, keys["main"][0])
    with pytest.raises(openai.NotFoundError) as caught:
        api.chat.completions.create(**{**chat(), "model": "gpt-4o"})
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):  # a streamed request fails before its stream
        api.chat.completions.create(**{**chat(), "model": "gpt-4o"}, stream=True)
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(**{**chat(), "temperature": -1})
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="smollm2", prompt="", max_tokens=4)
    for limits in ({"max_latency_ms": 0.001}, {"max_price": 0}):  # every node charges 1
        with pytest.raises(openai.InternalServerError) as caught:
            api.chat.completions.create(**chat(), extra_body=limits)
        assert caught.value.status_code == 503 and caught.value.code == "no_route"

    no_key = httpx.post(f"{gateway}/v1/chat/completions", json=chat(), timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    for name in ("revoked", None):
        with pytest.raises(openai.AuthenticationError):
            client(gateway, keys[name][0] if name else "lc-not-a-key").chat.completions.create(**chat())
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway, keys["broke"][0]).chat.completions.create(**chat())
    assert caught.value.status_code == 402 and caught.value.code == "insufficient_balance"


def test_each_request_debits_what_the_swarm_charged(gateway, keys, store):
    key, key_id = keys["meter"]
    api = client(gateway, key)
    before = store.get(key_id)
    whole = api.chat.completions.create(**chat("Name a color."))
    streamed = list(api.chat.completions.create(**chat("Name a fruit."), stream=True))
    charged = whole.model_extra["layerchain"]["cost"] + streamed[-1].model_extra["layerchain"]["cost"]
    after = store.get(key_id)
    assert charged > 0
    assert (before.balance - after.balance, after.spent - before.spent) == (charged, charged)
    assert after.requests == before.requests + 2


def test_a_caller_that_goes_away_stops_its_generation(gateway, keys):
    """Closing a stream mid-answer cancels the generation (sessions closed, nothing debited:
    the client reports no cost for an unfinished generation) and the gateway serves on."""
    body = {**chat("Write a long story about a dragon.", 64), "stream": True, "user": "quitter"}
    headers = {"Authorization": f"Bearer {keys['main'][0]}"}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=headers,
                      timeout=60) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    deadline = time.monotonic() + 10
    while True:
        state = httpx.get(f"{gateway}/api/swarm", headers=headers, timeout=30).json()
        mine = next(r for r in state["requests"] if r["user"] == "quitter")
        if mine["status"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mine["status"] == "cancelled" and mine["duration_s"] < 8  # 64 tokens take longer
    again = client(gateway, keys["main"][0]).chat.completions.create(**chat(max_tokens=8))
    assert "Paris" in again.choices[0].message.content


def test_concurrent_requests(gateway, keys):
    prompts = [QUESTION, "Name three rivers in Europe.", "What is 2 + 2?", "Say hello."]
    api = client(gateway, keys["main"][0])
    alone = [api.chat.completions.create(**chat(p, 8)).choices[0].message.content for p in prompts]

    async def together():
        async with openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=keys["main"][0],
                                      max_retries=0, timeout=120) as aio:
            return await asyncio.gather(*(aio.chat.completions.create(**chat(p, 8)) for p in prompts))

    t0 = time.perf_counter()
    replies = asyncio.run(asyncio.wait_for(together(), 180))
    elapsed = time.perf_counter() - t0
    assert [r.choices[0].message.content for r in replies] == alone  # nothing mixed up
    assert "Paris" in replies[0].choices[0].message.content
    state = httpx.get(f"{gateway}/api/swarm", timeout=30,
                      headers={"Authorization": f"Bearer {keys['main'][0]}"}).json()
    recent = [r for r in state["requests"] if r["status"] == "done"][:4]
    assert len(recent) == 4 and all(len(r["route"]) == 3 for r in recent)
    print(f"4 concurrent chat requests of 8 tokens: {elapsed:.2f} s")


def test_dashboard_in_headless_chromium(gateway, swarm, keys):
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: `make install` installs it"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(gateway + "/")
            # keys are on: the swarm view waits for a key, then shows the key's own requests
            page.wait_for_function("document.querySelector('#status').textContent.includes('API key')")
            assert page.is_visible("#chat-key")
            page.fill("#chat-key", keys["main"][0])
            page.wait_for_function("document.querySelectorAll('#nodes tbody tr').length === 3")
            shown = page.eval_on_selector_all("#nodes tbody tr", "rows => rows.map(r => r.dataset.peerId)")
            assert sorted(shown) == sorted(n["peer_id"] for n in swarm.nodes)
            counts = page.eval_on_selector_all("#coverage .block", "cells => cells.map(c => +c.dataset.count)")
            assert counts == [1] * BLOCKS
            page.fill("#chat-input", QUESTION)
            page.click("#chat-send")
            page.wait_for_selector('.msg.assistant:not([data-state="streaming"])')
            answer = page.locator(".msg.assistant").first
            assert answer.get_attribute("data-state") == "done", answer.inner_text()
            assert "Paris" in answer.locator(".text").inner_text()
            assert int(answer.get_attribute("data-chunks")) >= 2  # arrived in pieces: streamed
            assert answer.locator(".chain .hop").count() == 3  # the route of the answer
            # the request shows up in the recent requests, its route drawn as a chain of 3 hops
            page.wait_for_function("""() => {
                const li = document.querySelector('#requests li');
                return li && li.dataset.user === 'dashboard' && li.dataset.status === 'done'
                    && li.querySelectorAll('.chain .hop').length === 3; }""")
        finally:
            browser.close()


@pytest.mark.timeout(300)
def test_bench_gateway_prints_its_json():
    """`layerchain bench gateway --json` (in this process: no interpreter start of its own):
    its own swarm and gateway process, same text both ways, everything stopped afterwards."""
    from typer.testing import CliRunner

    from layerchain.cli.main import app

    done = CliRunner().invoke(app, ["bench", "gateway", "--nodes", "2", "--max-new-tokens", "8",
                                    "--concurrency", "2", "--json"])
    assert done.exit_code == 0, done.output[-2000:]
    result = json.loads(done.stdout)
    assert result["identical_text"] is True and result["nodes"] == 2
    assert result["tokens"] == 8 and result["concurrency"] == 2
    for key in ("direct_tps", "gateway_tps", "ratio", "gateway_ttft_s", "concurrent_tokens_per_s"):
        assert result[key] > 0, key
