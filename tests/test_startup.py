"""A one-shot ``layerchain generate`` starts fast (issue 21 item 5): checks without timings.

What the start-up is made of is pinned here structurally, so a regression fails on any
machine: the CLI's imports load no torch, transformers or hivemind (torch alone took 2-4 s
of the 4-9 s ``import layerchain.cli.main`` cost before); the hivemind DHT loads without
hivemind's training stack; the client joins the DHT while its head loads; the phase marks
``layerchain bench startup`` reads are written, and its result has the issue's fields. The
figures are in docs/BENCHMARKS.md "Start-up".
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest

from layerchain import timings
from layerchain.bench.startup import PHASES, phases_of
from layerchain.errors import ConfigError

HEAVY = ("torch", "transformers", "hivemind", "scipy", "eth_utils")


def _imports(code: str) -> set[str]:
    """Top-level packages loaded by ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=120)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_cli_imports_nothing_heavy():
    loaded = _imports("import layerchain.cli.main")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_help_of_every_command_still_works_without_the_heavy_imports():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom layerchain.cli.main import app\n"
            "runner = CliRunner()\n"
            "for cmd in ([], ['generate'], ['node', 'start'], ['bench', 'startup'],\n"
            "            ['bench', 'memory'], ['swarm', 'up']):\n"
            "    r = runner.invoke(app, [*cmd, '--help'])\n"
            "    assert r.exit_code == 0, (cmd, r.output)\n")
    loaded = _imports(code)
    assert not loaded & {"torch", "transformers", "hivemind"}


def test_the_dht_loads_without_hiveminds_training_stack():
    loaded = _imports("import torch\nimport layerchain.discovery.dht")
    assert "hivemind" in loaded
    assert "scipy" not in loaded  # hivemind.averaging / optim pull it in
    probe = ("import sys\nimport layerchain.discovery.dht\n"
             "assert 'hivemind.averaging' not in sys.modules\n"
             "import hivemind\n"
             "assert hivemind.DHT.__module__ == 'hivemind.dht.dht'\n"  # the rest, on first use
             "assert 'hivemind.averaging' in sys.modules\n"
             "assert hivemind.dht.node.DHTNode is layerchain.discovery.dht.DHTNode\n")
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=120)


def test_marks_are_silent_by_default_and_parse_back(monkeypatch, capsys):
    monkeypatch.delenv(timings.ENV, raising=False)
    timings.mark("command")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(timings.ENV, "1")
    with timings.timed("head_load"):
        pass
    timings.mark("ready")
    marks = timings.parse("noise\n" + capsys.readouterr().err)
    assert set(marks) == {"head_load", "ready"}
    assert marks["head_load"]["s"] is not None and marks["ready"]["s"] is None


def test_bench_startup_result_has_the_issues_fields():
    marks = {"command": {"at": 101.0, "s": None}, "dht_join": {"at": 102.0, "s": 0.5},
             "head_load": {"at": 103.0, "s": 1.5}, "ready": {"at": 103.1, "s": None},
             "first_token": {"at": 103.6, "s": None}}
    got = phases_of(marks, started_at=100.0, ended_at=104.0)
    assert set(got) == set(PHASES)
    assert {"import_s", "dht_join_s", "head_load_s", "first_token_s", "total_s"} <= set(got)
    assert got == {"import_s": 1.0, "dht_join_s": 0.5, "head_load_s": 1.5,
                   "first_token_s": 0.5, "ready_s": 3.1, "total_s": 4.0}
    with pytest.raises(KeyError):
        phases_of({k: v for k, v in marks.items() if k != "first_token"}, 100.0, 104.0)


def test_the_client_joins_the_dht_while_its_head_loads(monkeypatch):
    """AsyncSwarm.create starts the DHT join before the head loads and awaits it after: the
    two overlap (a one-shot generate waits for the longer, not the sum)."""
    import layerchain.client.swarm as client_swarm

    events: list[str] = []
    joined = threading.Event()

    class FakeDiscovery:
        async def close(self) -> None:
            events.append("closed")

    async def fake_join(peers):
        events.append("join started")
        await asyncio.sleep(0.05)
        joined.set()
        events.append("joined")
        return FakeDiscovery()

    class FakeSpec:  # what the client reads of a spec before its head loads
        def in_form(self, dtype):
            return self

    def fake_resolve(model):
        events.append("resolve")
        if model == "broken":  # fails after the join is up
            assert joined.wait(5)
            raise ConfigError("no such model")
        return FakeSpec()

    def fake_head(spec, **_):
        events.append(f"head (joined: {joined.is_set()})")
        return object()

    monkeypatch.setattr(client_swarm, "join_as_client", fake_join)
    monkeypatch.setattr(client_swarm, "resolve_model", fake_resolve)
    monkeypatch.setattr(client_swarm, "check_private_blocks", lambda spec, n: None)
    monkeypatch.setattr(client_swarm, "load_head", fake_head)
    monkeypatch.setattr(client_swarm, "resolve_dtype", lambda d, dev: d)
    monkeypatch.setattr(client_swarm, "load_tokenizer", lambda spec: object())
    built = {}
    monkeypatch.setattr(client_swarm.AsyncSwarm, "__init__",
                        lambda self, **kw: built.update(kw))

    asyncio.run(client_swarm.AsyncSwarm.create(["/ip4/127.0.0.1/tcp/1/p2p/x"]))
    # the join began before the head loaded, and ended after: they overlapped
    assert events.index("join started") < events.index("head (joined: False)")
    assert isinstance(built["discovery"], FakeDiscovery)

    events.clear()
    joined.clear()
    with pytest.raises(ConfigError, match="no such model"):
        asyncio.run(client_swarm.AsyncSwarm.create(["/ip4/127.0.0.1/tcp/1/p2p/x"],
                                                   model="broken"))
    assert events[-2:] == ["joined", "closed"]  # the DHT that got up is not left running
