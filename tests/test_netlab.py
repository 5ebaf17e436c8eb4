"""The emulated-host lab itself (``layerchain.bench.netlab``) and ``bench rtt``'s input checks.

No node process; the lab test builds a router, three hosts and a NAT and starts small probe
processes in them (root only: elsewhere it skips saying why), so it is marked slow. The
multi-host swarm tests are in test_multihost_e2e.py.
"""

from __future__ import annotations

import subprocess

import pytest
from typer.testing import CliRunner

from layerchain.bench import netlab
from layerchain.bench.netlab import Lab, LabError, tcp_rtt_ms
from layerchain.bench.rtt import _spans, parse_rtts
from layerchain.cli.main import app
from layerchain.errors import ConfigError
from netlab import lab_or_skip


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_rtt_list_parses_and_bad_values_are_refused_with_the_flag_named():
    assert parse_rtts("0,5, 25,50,100") == [0.0, 5.0, 25.0, 50.0, 100.0]
    for bad in ("", "5,x", "-1", "nan", "1e9", ","):
        with pytest.raises(ConfigError, match="--rtt-ms"):
            parse_rtts(bad)


def test_bench_rtt_with_a_bad_list_fails_in_one_line_before_building_anything():
    result = CliRunner().invoke(app, ["bench", "rtt", "--rtt-ms", "5,fast"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--rtt-ms" in lines[0], lines


def test_three_hops_split_the_model_evenly():
    assert _spans(30, 3) == ["0:10", "10:20", "20:30"]
    assert _spans(4, 3) == ["0:1", "1:3", "3:4"]


def test_without_root_or_a_tool_the_lab_says_why_and_tests_skip_with_it(monkeypatch, tmp_path):
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    reason = netlab.unavailable()
    assert reason and "root" in reason
    with pytest.raises(ConfigError, match="root"):
        Lab.create(tmp_path)
    with pytest.raises(pytest.skip.Exception, match="MULTI-HOST TESTS SKIPPED.*root"):
        lab_or_skip(tmp_path)
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlab.shutil, "which", lambda tool: None if tool == "iptables" else "/x")
    assert "apt-get install iptables" in (netlab.unavailable() or "")


@pytest.mark.slow
def test_a_lab_routes_masquerades_delays_and_is_removed_by_name_even_after_a_failure(tmp_path):
    lab = lab_or_skip(tmp_path)
    mine = {f"{lab.tag}-{name}" for name in ("r", "a", "b", "nat", "home")}
    with pytest.raises(RuntimeError, match="a test failing mid-way"):
        with lab:
            lab.add_router("r")
            lab.add_subnet("one", router="r", hosts=["a"])
            lab.add_subnet("two", router="r", hosts=["b"])
            lab.add_nat("nat", upstream="two", hosts=["home"])
            lab.add_default_routes()
            assert mine <= _namespaces()
            assert lab.hosts["a"].address.startswith("10.199.")
            assert tcp_rtt_ms(lab, "a", "b", samples=10)["p50"] < 5.0  # routed, no delay
            assert tcp_rtt_ms(lab, "home", "b", samples=10)["p50"] < 5.0  # out through NAT
            with pytest.raises(LabError):  # but nothing gets in
                tcp_rtt_ms(lab, "a", "home", samples=3)
            lab.set_delay("r", 10.0)
            assert tcp_rtt_ms(lab, "a", "b", samples=10)["p10"] > 10.0
            sleeper = lab.popen("b", ["sleep", "600"])
            raise RuntimeError("a test failing mid-way")
    assert not mine & _namespaces()  # every namespace gone, by name
    assert sleeper.poll() is not None  # and every process the lab started


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_bench_rtt_adds_one_round_trip_per_hop_per_token(tmp_path, tiny_model_dir):
    """On a model whose compute is a fraction of a millisecond, the bench's figures are the
    network's: 3 hops at 20 ms cost about 60 ms more per token than at 0 ms in pull mode,
    less in push mode (about 40 ms: 4 one-way transfers)."""
    lab_or_skip(tmp_path).close()  # skips where the bench can't run
    from layerchain.bench.rtt import run_rtt_bench

    result = run_rtt_bench([0.0, 20.0], model=str(tiny_model_dir("llama", tokenizer=True)),
                           max_new_tokens=8, runs=2)
    assert result["hops"] == 3 and result["runs"] == 2 and result["transport"] == "tls"
    assert result["identical"]  # pull and push: the same tokens
    points = [p for p in result["points"] if p["mode"] == "pull"]
    pushed = [p for p in result["points"] if p["mode"] == "push"]
    assert [p["rtt_ms"] for p in points] == [p["rtt_ms"] for p in pushed] == [0.0, 20.0]
    assert set(points[0]) == {"rtt_ms", "mode", "tokens_per_s", "ttft_s", "ms_per_token",
                              "measured_rtt_ms"}
    assert 19.9 <= points[1]["measured_rtt_ms"] <= 25.0 and points[0]["measured_rtt_ms"] < 1.0
    added = points[1]["ms_per_token"] - points[0]["ms_per_token"]
    assert 3 * 20.0 * 0.9 <= added <= 3 * 20.0 * 1.5, points  # one round trip per hop
    assert points[1]["ttft_s"] > points[0]["ttft_s"]
    # push: 4 one-way transfers per token (client, 2 forwards, back): 2 round trips
    added_push = pushed[1]["ms_per_token"] - pushed[0]["ms_per_token"]
    assert added_push < added, result["points"]
    print(f"bench rtt on the tiny model: {result['points']}")
