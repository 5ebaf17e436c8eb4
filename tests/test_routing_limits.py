"""Routing limits have one home (issue 16.6): ``layerchain.routing.RouteLimits``, held by
the client's and the gateway's configs and passed whole to the planner."""

from __future__ import annotations

import dataclasses

import pytest

from layerchain.client import ClientConfig, RouteLimits
from layerchain.client.swarm import client_config
from layerchain.errors import ConfigError
from layerchain.gateway.config import GatewayConfig
from layerchain.routing import RouteLimits as PlannerLimits


def test_one_record_everywhere():
    assert RouteLimits is PlannerLimits
    assert ClientConfig().limits == GatewayConfig().limits == RouteLimits()
    for record in (ClientConfig, GatewayConfig):  # no second copy of the three fields
        names = {f.name for f in dataclasses.fields(record)}
        assert not names & {"alpha", "max_price", "max_latency_ms"}, record


@pytest.mark.parametrize("bad", [
    {"alpha": -0.1}, {"alpha": 1.5}, {"alpha": float("nan")}, {"alpha": True},
    {"alpha": "1"}, {"max_price": -1}, {"max_price": float("inf")},
    {"max_latency_ms": -5}, {"max_latency_ms": float("nan")},
])
def test_bad_limits_are_one_typed_line(bad):
    with pytest.raises(ConfigError) as caught:
        RouteLimits(**bad)
    assert next(iter(bad)) in caught.value.message and "\n" not in caught.value.message
    with pytest.raises(ConfigError):  # a partial override is re-validated too
        dataclasses.replace(RouteLimits(), **bad)


def test_loose_limits_still_configure_a_client():
    config = client_config(ClientConfig(), {"alpha": 1, "max_price": 3.5, "insecure": True})
    assert config.limits == RouteLimits(alpha=1, max_price=3.5) and config.insecure
    kept = client_config(ClientConfig(limits=RouteLimits(max_latency_ms=80)), {"alpha": 0.5})
    assert kept.limits == RouteLimits(alpha=0.5, max_latency_ms=80)  # field by field
    whole = client_config(ClientConfig(), {"limits": RouteLimits(alpha=0.25)})
    assert whole.limits == RouteLimits(alpha=0.25)
    with pytest.raises(ConfigError, match="alpha"):
        client_config(ClientConfig(), {"alpha": 7})
