"""`layerchain models` through the real app, in-process, over the in-memory DHT (fast).

The real-process check (two models served by node processes) is tests/test_catalog_e2e.py.
"""

from __future__ import annotations

import asyncio
import json

from typer.testing import CliRunner

from layerchain.cli import models as models_cli
from layerchain.cli.main import app
from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery
from layerchain.discovery.catalog import CATALOG_KEY, sign_entry
from test_catalog import entry_of, manifest

ADDR = "/ip4/127.0.0.1/tcp/1/p2p/QmTMn9y1LQ3jYjNUR1sgLtRjL4mfuBNWdLyHWzptr8sMyR"


def _swarm(record_for) -> MemoryDHT:
    """A hub with one 4-block model served over blocks 0:2 by one peer."""
    hub, me = MemoryDHT(), Identity.generate()
    body = manifest("tiny [bold]x[/bold]", 4)  # Rich markup in a name stays text

    async def fill() -> None:
        discovery = MemoryDiscovery(hub, me)
        entry = entry_of(me, body)
        await discovery.put_entry(CATALOG_KEY, sign_entry(me, entry), entry.expires_at)
        await discovery.announce(record_for(me, 0, 2, model_id=body["model_id"], ms_per_block=2.0))

    asyncio.run(fill())
    return hub


def test_models_json_and_table(record_for, monkeypatch):
    hub = _swarm(record_for)

    async def join(peers: list[str]) -> MemoryDiscovery:
        assert peers == [ADDR]
        return MemoryDiscovery(hub)

    monkeypatch.setattr(models_cli, "join_dht", join)
    runner = CliRunner()
    result = runner.invoke(app, ["models", "--initial-peers", ADDR, "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["models"]
    assert set(row) == {"model_id", "name", "family", "num_blocks", "hidden_size", "dtype",
                        "servers", "blocks_served", "replicas", "throughput_tokens_per_s"}
    assert (row["servers"], row["blocks_served"], row["replicas"]) == (1, 2, [1, 1, 0, 0])
    assert row["throughput_tokens_per_s"] == 0.0  # blocks 2, 3 have no server
    table = runner.invoke(app, ["models", "--initial-peers", ADDR], env={"COLUMNS": "160"})
    assert table.exit_code == 0 and "tiny [bold]x[/bold]" in table.stdout
    assert "2/4" in table.stdout


def test_models_errors_are_one_line(monkeypatch):
    runner = CliRunner()
    missing = runner.invoke(app, ["models", "--json"])
    assert missing.exit_code == 1 and missing.output.count("\n") == 1
    assert "--initial-peers" in missing.output
    bad = runner.invoke(app, ["models", "--initial-peers", "junk"])
    assert bad.exit_code == 1 and "bad initial peer address 'junk'" in bad.output
    assert bad.output.count("\n") == 1
