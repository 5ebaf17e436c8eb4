"""`layerchain bench --concurrency` and the split single-stream figure.

Fast: the point arithmetic (percentiles, aggregate, ttft, inter-token latency), the token
timings' split (client, nodes, wire per hop), the CLI's wiring. Slow (one): concurrency 1
and 2 on a real local swarm of 2 node processes, few tokens: the points' JSON shape, and
every stream's tokens equal the single-process greedy tokens of its prompt.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from layerchain.bench import concurrency as conc
from layerchain.bench.concurrency import (
    PROMPTS,
    StreamRun,
    cpu_ms_per_token,
    cpu_seconds,
    gaps_ms,
    identical_tokens,
    measure_point,
    parse_levels,
    percentile,
    stream_prompts,
)
from layerchain.bench.swarm import split_figures
from layerchain.client.timing import StepStamp, TokenTiming, token_timings

POINT_KEYS = {"concurrency", "aggregate_tokens_per_s", "ttft_s_p50", "ttft_s_p99",
              "itl_ms_p50", "itl_ms_p99"}


# ---------------------------------------------------------------- percentiles


def test_percentile_interpolates_between_ranks_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)  # numpy.percentile: 3.97
    assert percentile(list(range(101)), 99) == 99.0


def test_percentile_of_one_value_and_of_none():
    assert percentile([7.5], 50) == 7.5
    assert percentile([7.5], 99) == 7.5
    assert percentile([], 50) == 0.0


def test_gaps_are_the_inter_token_latencies_in_ms():
    assert gaps_ms([1.0, 1.25, 1.75]) == [250.0, 500.0]
    assert gaps_ms([1.0]) == []


# ---------------------------------------------------------------- a point


def _run(prompt: str, arrivals: list[float], client: float = 2.0, nodes: float = 30.0) -> StreamRun:
    n = len(arrivals)
    return StreamRun(prompt, tuple(range(n)), tuple(arrivals),
                     client_ms=(client,) * (n - 1), node_ms=(nodes,) * (n - 1))


def test_a_point_adds_every_streams_tokens_over_the_wall_time():
    runs = [_run("a", [0.5, 0.6, 0.7, 0.8]), _run("b", [1.0, 1.2, 1.4, 1.6])]
    point = measure_point(2, runs, wall_s=2.0)
    assert POINT_KEYS <= set(point)
    assert point["concurrency"] == 2
    assert point["tokens"] == 8
    assert point["aggregate_tokens_per_s"] == 4.0  # 8 tokens in 2 s
    assert point["ttft_s_p50"] == 0.75  # first arrivals 0.5 and 1.0
    assert point["ttft_s_p99"] == pytest.approx(0.995)
    # gaps: 100 ms x 3 (stream a), 200 ms x 3 (stream b): pooled over streams
    assert point["itl_ms_p50"] == 150.0
    assert point["itl_ms_p99"] == 200.0
    assert point["client_compute_ms_p50"] == 2.0
    assert point["node_compute_ms_p50"] == 30.0
    assert point["client_busy"] == 0.006  # 6 decode steps x 2 ms in 2 s


def test_a_point_of_one_stream_with_one_token_has_no_gaps():
    point = measure_point(1, [_run("a", [0.3])], wall_s=0.3)
    assert point["itl_ms_p50"] == 0.0 and point["itl_ms_p99"] == 0.0
    assert point["ttft_s_p50"] == 0.3
    assert point["aggregate_tokens_per_s"] == pytest.approx(3.33)


def test_a_point_without_wall_time_reports_zero_rates():
    point = measure_point(1, [], wall_s=0.0)
    assert point["aggregate_tokens_per_s"] == 0.0 and point["client_busy"] == 0.0


def test_identical_tokens_compares_each_prompt_with_its_first_stream():
    a1, b1 = StreamRun("a", (1, 2), (0.1, 0.2)), StreamRun("b", (3, 4), (0.1, 0.2))
    same = [[a1], [a1, b1], [a1, b1, StreamRun("a", (1, 2), (0.5, 0.9))]]
    assert identical_tokens(same)
    assert not identical_tokens([[a1], [StreamRun("a", (1, 5), (0.1, 0.2)), b1]])
    assert identical_tokens([])


def test_streams_take_distinct_prompts_then_wrap_around():
    assert len(set(PROMPTS)) == len(PROMPTS) == 8
    assert stream_prompts(2) == list(PROMPTS[:2])
    assert stream_prompts(9)[8] == PROMPTS[0]


def test_cpu_per_token_is_each_processes_cpu_over_the_point_per_token():
    assert cpu_ms_per_token([1.0, 10.0], [1.5, 12.0], 100) == [5.0, 20.0]
    assert cpu_ms_per_token([1.0], [2.0], 0) == [0.0]  # no tokens: no rate
    with pytest.raises(ValueError):
        cpu_ms_per_token([1.0], [2.0, 3.0], 10)


def test_cpu_seconds_reads_a_process_and_its_children_and_zero_for_one_gone():
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "sum(range(3_000_000))"])
    child.wait()
    assert cpu_seconds(os.getpid(), children=False) > 0.0
    assert cpu_seconds(child.pid) == 0.0  # reaped: gone


def test_parse_levels():
    assert parse_levels("1,2,4,8") == [1, 2, 4, 8]
    assert parse_levels(" 3 ,") == [3]
    for bad in ("", "0,2", "-1", "two"):
        with pytest.raises(ValueError):
            parse_levels(bad)


# ---------------------------------------------------------------- the split figure


def test_token_timings_run_each_step_to_the_next_ones_start():
    stamps = [
        StepStamp(began=10.000, ended=10.050, client_s=0.010, route_s=0.040, node_ms=(5.0, 6.0)),
        StepStamp(began=10.060, ended=10.090, client_s=0.004, route_s=0.025, node_ms=(7.0,)),
    ]
    first, last = token_timings(stamps)
    assert first.token_ms == pytest.approx(60.0)  # to the next step's start
    assert last.token_ms == pytest.approx(30.0)  # the last: to its own end
    assert (first.client_ms, first.route_ms, first.node_ms) == (10.0, 40.0, (5.0, 6.0))
    assert first.nodes_ms == 11.0
    assert token_timings([]) == ()


def test_wire_per_hop_is_what_neither_side_computed():
    t = TokenTiming(token_ms=40.0, client_ms=7.0, route_ms=32.0, node_ms=(9.0, 10.0, 11.0))
    assert t.wire_ms(3) == pytest.approx(1.0)  # (40 - 7 - 30) / 3
    assert t.wire_ms(0) == pytest.approx(3.0)  # no hops: not a division by zero


def test_split_figures_are_medians_over_decode_tokens():
    timings = [
        TokenTiming(token_ms=40.0, client_ms=7.0, route_ms=32.0, node_ms=(10.0, 10.0, 10.0)),
        TokenTiming(token_ms=50.0, client_ms=8.0, route_ms=38.0, node_ms=(11.0, 11.0, 11.0)),
        TokenTiming(token_ms=45.0, client_ms=9.0, route_ms=35.0, node_ms=(10.0, 10.0, 12.0)),
    ]
    split = split_figures(timings, hops=3)
    assert split["node_compute_ms_p50"] == 32.0
    assert split["client_compute_ms_p50"] == 8.0
    assert split["wire_ms_per_hop_p50"] == pytest.approx(1.333, abs=1e-3)  # (45-9-32)/3 = 4/3
    assert split["route_wire_ms_per_hop_p50"] == pytest.approx(1.0)  # (32-30)/3, (38-33)/3, (35-32)/3
    assert split["client_loop_ms_p50"] == pytest.approx(1.0)  # 40-7-32, 50-8-38, 45-9-35
    assert split_figures([], hops=3)["wire_ms_per_hop_p50"] == 0.0


# ---------------------------------------------------------------- the CLI


def test_the_cli_runs_the_levels_given_and_prints_the_points(monkeypatch):
    from layerchain.cli.main import app

    calls = []

    def fake(levels, **options):
        calls.append((levels, options))
        return {"points": [measure_point(n, [], 1.0) for n in levels]}

    monkeypatch.setattr(conc, "run_concurrency_bench", fake)
    out = CliRunner().invoke(app, ["bench", "--concurrency", "1,2", "--nodes", "2",
                                   "--max-new-tokens", "5", "--json"])
    assert out.exit_code == 0, out.output
    assert [p["concurrency"] for p in json.loads(out.output)["points"]] == [1, 2]
    assert calls == [([1, 2], {"model": "smollm2", "nodes": 2, "max_new_tokens": 5,
                               "threads": None, "insecure": False, "batch_window_ms": None})]
    out = CliRunner().invoke(app, ["bench", "--concurrency", "8", "--batch-window-ms", "0",
                                   "--json"])
    assert out.exit_code == 0, out.output
    assert calls[-1][1]["batch_window_ms"] == 0.0  # the nodes' --batch-window-ms: no batching


def test_the_cli_refuses_bad_levels_in_one_line():
    from layerchain.cli.main import app

    out = CliRunner().invoke(app, ["bench", "--concurrency", "0,2"])
    assert out.exit_code == 2
    assert "--concurrency" in out.output and "must be positive" in out.output


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_concurrent_streams_on_a_real_swarm_give_each_prompts_greedy_tokens(tmp_path, reference):
    from layerchain.local import swarm_down, swarm_up
    from layerchain.model import SamplingParams
    from layerchain.model.spec import DEFAULT_MODEL
    from layerchain.types import even_spans

    tokens = 4
    local = swarm_up(tmp_path, even_spans(30, 2), threads=1)
    try:
        points, runs = conc.measure_concurrency(local.initial_peers, [1, 2],
                                                max_new_tokens=tokens, warmup_tokens=0,
                                                node_pids=[n["pid"] for n in local.nodes])
    finally:
        swarm_down(tmp_path, quiet=True)
    assert [p["concurrency"] for p in points] == [1, 2]
    for p in points:
        assert POINT_KEYS <= set(p)
        assert p["aggregate_tokens_per_s"] > 0 and p["itl_ms_p99"] >= p["itl_ms_p50"] > 0
        assert p["ttft_s_p99"] >= p["ttft_s_p50"] > 0
        json.dumps(p)  # plain JSON
    assert points[0]["head_batches"] == 0  # one stream: its head alone, every token
    for p in points:  # where the cores went: every node and the client computed
        assert len(p["nodes_cpu_ms_per_token"]) == 2 and min(p["nodes_cpu_ms_per_token"]) > 0
        assert p["client_cpu_ms_per_token"] > 0
    assert [r.prompt for r in runs[1]] == list(PROMPTS[:2])
    params = SamplingParams(max_new_tokens=tokens)
    for run in (*runs[0], *runs[1]):
        assert run.token_ids == reference(DEFAULT_MODEL, run.prompt, params).token_ids
        assert len(run.arrivals_s) == len(run.token_ids)
        # every decode step's nodes reported their compute (2 hops, each > 0)
        assert len(run.node_ms) == len(run.token_ids) - 1 and min(run.node_ms) > 0
    assert identical_tokens(runs)
