"""``layerchain bench floor``: the bare-socket floor of a hop (issue 16), pull and push, over
real processes and loopback sockets, with small weights so that it runs in seconds."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from layerchain.bench.floor import HOPS, run_floor_bench
from layerchain.cli.main import app
from layerchain.errors import ConfigError


def test_floor_reports_both_modes_from_real_processes():
    result = run_floor_bench(tokens=6, rounds=1, node_mb=2.0, head_mb=2.0)
    modes = {p["mode"]: p for p in result["points"]}
    assert set(modes) == {"pull", "push"}
    assert modes["pull"]["handoffs_per_token"] == 2 * HOPS
    assert modes["push"]["handoffs_per_token"] == HOPS + 1
    for point in modes.values():
        # a token took time beyond its compute (the handoffs), and both were measured
        assert point["token_ms_p50"] > point["compute_ms_p50"] > 0
        assert point["wire_ms_per_hop_p50"] >= point["wire_ms_per_hop_min"] > 0
    assert result["frame_bytes"] == 4 + 576 * 4 + 8


def test_floor_refuses_a_bad_request_in_one_line():
    run = CliRunner().invoke(app, ["bench", "floor", "--tokens", "2", "--json"])
    assert run.exit_code != 0
    assert "bench floor needs --tokens >= 3" in run.output
    assert "Traceback" not in run.output
    with pytest.raises(ConfigError):
        run_floor_bench(tokens=6, rounds=0)


def test_a_floor_node_gone_is_one_typed_error():
    import socket

    import torch

    from layerchain.bench.floor import _decode
    from layerchain.errors import PeerUnreachable

    ours, theirs = socket.socketpair()
    theirs.close()  # the node died
    with ours, pytest.raises(PeerUnreachable, match="floor node"):
        _decode(3, [(ours, ours)], torch.randn(576, 576), 576)
