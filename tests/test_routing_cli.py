"""`layerchain route` and `layerchain bench routing`, in process."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from layerchain.bench.routing import run_routing_bench
from layerchain.cli.main import app

SNAPSHOT = {
    "num_blocks": 30,
    "peers": [
        {"id": "lan-a", "start": 0, "end": 15,
         "ms_per_block": 0.5, "price_per_block": 2.0, "rtt_ms": 0.5},
        {"id": "lan-b", "start": 15, "end": 30,
         "ms_per_block": 0.5, "price_per_block": 2.0, "rtt_ms": 0.5},
        {"id": "far", "start": 0, "end": 30,
         "ms_per_block": 1.0, "price_per_block": 0.5, "rtt_ms": 40.0},
    ],
}


def invoke(tmp_path, *args, snapshot=SNAPSHOT):
    path = tmp_path / "swarm.json"
    path.write_text(snapshot if isinstance(snapshot, str) else json.dumps(snapshot))
    return CliRunner().invoke(app, ["route", "--snapshot", str(path), *args])


def test_route_json_shape_and_values(tmp_path):
    result = invoke(tmp_path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc) == ["route", "latency_ms", "price", "cost", "pareto"]
    assert doc["route"] == [{"peer": "lan-a", "start": 0, "end": 15},
                            {"peer": "lan-b", "start": 15, "end": 30}]
    assert doc["latency_ms"] == 16.0 and doc["price"] == 60.0 and doc["cost"] == 16.0
    assert doc["pareto"][0] == {"latency_ms": 16.0, "price": 60.0}
    assert doc["pareto"][-1] == {"latency_ms": 70.0, "price": 15.0}
    assert all(set(p) == {"latency_ms", "price"} for p in doc["pareto"])


def test_route_max_price_steers_to_the_cheap_peer(tmp_path):
    doc = json.loads(invoke(tmp_path, "--json", "--max-price", "15").stdout)
    assert [h["peer"] for h in doc["route"]] == ["far"]
    doc = json.loads(invoke(tmp_path, "--json", "--alpha", "1").stdout)
    assert doc["price"] == 15.0


def test_route_table_output(tmp_path):
    result = invoke(tmp_path)
    assert result.exit_code == 0, result.output
    assert "lan-a" in result.stdout and "0:15" in result.stdout and "Pareto" in result.stdout


def test_route_exit_2_when_no_route_meets_the_limits(tmp_path):
    result = invoke(tmp_path, "--max-price", "10")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: no route within max_price 10: the cheapest costs 15 (latency 70 ms)")
    missing = {"num_blocks": 40, "peers": SNAPSHOT["peers"]}
    result = invoke(tmp_path, "--json", snapshot=missing)
    assert result.exit_code == 2 and "blocks 30:40 have no peer" in result.stderr


def test_route_malformed_snapshot_is_one_line(tmp_path):
    for bad in ("{not json", json.dumps({"peers": []}),
                json.dumps({"num_blocks": 30, "peers": [{"id": "a", "start": 0}]}),
                json.dumps({"num_blocks": 30, "peers": [dict(SNAPSHOT["peers"][0], rtt_ms="x")]})):
        result = invoke(tmp_path, snapshot=bad)
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "snapshot" in lines[0]


def test_bench_routing_keys():
    result = run_routing_bench(peers=200, blocks=16, trials=3)
    assert list(result)[:4] == ["plan_ms_p50", "plan_ms_p99", "peers", "blocks"]
    assert result["peers"] == 200 and result["blocks"] == 16
    assert 0 < result["plan_ms_p50"] <= result["plan_ms_p99"]
    limited = run_routing_bench(peers=200, blocks=16, trials=2, limits=True)
    assert limited["limits"] is True and limited["plan_ms_p50"] > 0


def test_bench_routing_cli():
    result = CliRunner().invoke(app, ["bench", "routing", "--peers", "100", "--blocks", "8",
                                      "--trials", "2", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["peers"] == 100
    client = out["client"]  # snapshot + plan as a client pays them, after a few changes
    assert client["plans"] == 6 and client["case"] == "client snapshot + plan"
    for name in ("snapshot", "plan", "total", "first_snapshot", "fresh_snapshot"):
        assert client[f"{name}_ms_p50"] > 0 and client[f"{name}_cpu_ms_p50"] >= 0


def test_a_snapshot_may_say_how_busy_a_peer_is(tmp_path):
    busy = {"num_blocks": 30, "peers": [
        {"id": "busy", "start": 0, "end": 30, "ms_per_block": 0.5, "price_per_block": 1.0,
         "rtt_ms": 1.0, "queue_ms": 40.0},
        {"id": "idle", "start": 0, "end": 30, "ms_per_block": 1.0, "price_per_block": 1.0,
         "rtt_ms": 1.0}]}
    result = invoke(tmp_path, "--json", snapshot=busy)
    assert result.exit_code == 0, result.output
    assert [hop["peer"] for hop in json.loads(result.stdout)["route"]] == ["idle"]
    table = invoke(tmp_path, "--explain", snapshot={**busy, "peers": busy["peers"][:1]})
    assert table.exit_code == 0 and "queue ms" in table.stdout and "40.00" in table.stdout
    bad = {**busy, "peers": [dict(busy["peers"][0], queue_ms=-1.0)]}
    result = invoke(tmp_path, snapshot=bad)
    assert result.exit_code == 1 and "queue_ms" in result.stderr
