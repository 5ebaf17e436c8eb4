"""Peer-supplied strings reach the operator's terminal as text, never as Rich markup.

A hostile node answers `swarm status` with markup in its peer id and error message; a route
snapshot names a peer with markup; the demo's payments table shows peer ids and addresses.
In process: a fake node on loopback TCP, the CLI through CliRunner.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
from rich.console import Console
from typer.testing import CliRunner

from layerchain.cli import demo as demo_cli
from layerchain.cli import swarm as swarm_cli
from layerchain.cli.main import app
from layerchain.wire import messages as m
from layerchain.wire.rpc import serve_connection
from layerchain.wire.tcp import TcpTransport
from layerchain.wire.transport import Listener

LINK = "[link=https://evil.example]click[/link]"  # would become a hyperlink
CLOSER = "[/bold]"  # crashed `swarm status` (MarkupError: closing tag with nothing open)


@pytest.fixture
def hostile_node() -> Iterator[str]:
    """A node on loopback whose InfoReply carries markup; yields its endpoint."""
    loop = asyncio.new_event_loop()

    async def handle(request: object) -> object:
        return m.InfoReply(
            rid=getattr(request, "rid", 0), peer_id=f"{LINK}{CLOSER}", model_id="x",
            start=0, end=30, ms_per_block=1.0, price_per_block=1, free_cache_tokens=64,
            wallet="", version=CLOSER,
        )

    async def start() -> Listener:
        return await TcpTransport().listen(
            "tcp://127.0.0.1:0", lambda conn: serve_connection(conn, handle)
        )

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    listener = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield listener.endpoint
    asyncio.run_coroutine_threadsafe(listener.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def wide(monkeypatch):
    """CLI consoles that do not wrap (so a literal stays on one line) and keep no colour."""
    for module in (swarm_cli, demo_cli):
        monkeypatch.setattr(module, "console", Console(width=400, color_system=None))
    monkeypatch.setenv("COLUMNS", "400")  # consoles made at call time (route's)


def test_swarm_status_shows_markup_as_text(tmp_path, hostile_node, wide):
    unreachable = f"tcp://127.0.0.1:1/{LINK}{CLOSER}"  # a bad endpoint: its error echoes it
    (tmp_path / "swarm.json").write_text(json.dumps({
        "initial_peers": [], "bootstrap_pid": 0,
        "nodes": [{"pid": 0, "peer_id": "", "start": 0, "end": 30, "endpoint": hostile_node},
                  {"pid": 0, "peer_id": "", "start": 0, "end": 30, "endpoint": unreachable}],
    }))
    result = CliRunner().invoke(  # the hostile node serves plaintext: --insecure to ask it
        app, ["swarm", "status", "--state-dir", str(tmp_path), "--insecure"]
    )
    assert result.exit_code == 0, result.output
    assert f"{LINK}{CLOSER}" in result.output  # the peer id, as the peer wrote it
    assert "\x1b]8;" not in result.output  # no OSC 8 hyperlink escape


def test_route_explain_shows_a_peer_id_with_markup_as_text(tmp_path, wide):
    name = f"{LINK}{CLOSER}"
    snapshot = {"num_blocks": 4, "peers": [{"id": name, "start": 0, "end": 4,
                "ms_per_block": 1.0, "price_per_block": 1.0, "rtt_ms": 1.0}]}
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps(snapshot))
    result = CliRunner().invoke(app, ["route", "--snapshot", str(path), "--explain"])
    assert result.exit_code == 0, result.output
    assert name in result.output


def test_demo_payments_table_shows_markup_as_text():
    console = Console(width=400, color_system=None, record=True)
    console.print(demo_cli.payments_table({"client_spent": 3, "nodes": [{
        "peer_id": "[/b]" + "x" * 8, "address": "[link=a]", "blocks": 3, "price": 1,
        "tokens": 1, "earned": 3}]}))
    text = console.export_text()
    assert "[/b]xxxxxx" in text and "[link=a]" in text
