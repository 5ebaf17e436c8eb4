"""NodeConfig checks its settings itself: Python users get the CLI's checks, one line each."""

from __future__ import annotations

import pytest

from layerchain.errors import ConfigError
from layerchain.node import NodeConfig


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"max_cache_tokens": 0}, "max_cache_tokens"),
        ({"max_sessions": -1}, "max_sessions"),
        ({"max_connections": 0}, "max_connections"),
        ({"read_timeout_s": 0}, "read_timeout_s"),
        ({"session_idle_timeout_s": -5}, "session_idle_timeout_s"),
        ({"first_step_timeout_s": 0}, "first_step_timeout_s"),
        ({"drain_s": -1}, "drain_s"),
        ({"price_per_block": -2}, "price_per_block"),
        ({"stake": -1}, "stake"),
        ({"port": 70_000}, "port"),
        ({"dht_port": -1}, "dht_port"),
        ({"start": 4, "end": 2}, "end"),
        ({"start": -1}, "start"),
        ({"refresh_s": 60, "record_ttl_s": 60}, "refresh_s"),
        ({"max_session_tokens": 40_000}, "max_session_tokens"),
        ({"max_connection_tokens": 100}, "max_connection_tokens"),
        ({"max_sessions": "many"}, "max_sessions"),
        ({"host": ""}, "host"),
        ({"announce_host": "0.0.0.0"}, "announce_host"),  # nobody can dial the wildcard
        ({"announce_host": "two words"}, "announce_host"),
        ({"announce_port": 70_000}, "announce_port"),
        ({"announce_port": -1}, "announce_port"),
        ({"batch_window_ms": -1.0}, "batch_window_ms"),
    ],
)
def test_bad_settings_are_a_config_error_naming_the_field(settings, field):
    with pytest.raises(ConfigError, match=field) as caught:
        NodeConfig(**settings)
    assert "\n" not in str(caught.value)


def test_defaults_are_valid_and_resolve_the_admission_caps():
    config = NodeConfig()
    assert (config.session_tokens, config.connection_tokens) == (8192, 16384)
    small = NodeConfig(max_cache_tokens=2048, max_session_tokens=1000, max_connection_tokens=1500)
    assert (small.session_tokens, small.connection_tokens) == (1000, 1500)


def test_the_cli_relies_on_node_config(tmp_path):
    from typer.testing import CliRunner

    from layerchain.cli.main import app

    result = CliRunner().invoke(app, ["node", "start", "--blocks", "0:2", "--new-swarm",
                                      "--data-dir", str(tmp_path), "--max-cache-tokens", "0"])
    assert result.exit_code == 1
    assert "max_cache_tokens must be positive" in result.output
