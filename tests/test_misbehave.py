"""Cheating nodes (``--misbehave MODE``): each mode returns wrong hidden states under
receipts that pass every cheap check, and exactly its wrong steps are far from an honest
recomputation (what an audit sees); the honest span it was given stays untouched."""

from __future__ import annotations

import asyncio

import pytest
import torch

from layerchain.discovery import Identity, MemoryDHT, MemoryDiscovery
from layerchain.errors import ConfigError
from layerchain.market import ReceiptVerifier, Wallet
from layerchain.market.commitment import AUDIT_TOLERANCE, commitment_distance
from layerchain.market.receipts import SignedReceipt
from layerchain.model import load_span, resolve_model
from layerchain.node import Node, NodeConfig
from layerchain.node.misbehave import (
    MODES,
    SOMETIMES_RATE,
    Misbehavior,
    cheating_span,
    replay,
    requantize,
    skipped_blocks,
)
from layerchain.types import Span
from layerchain.wire import MemoryNetwork, MemoryTransport
from layerchain.wire import messages as m

BLOCKS = (0, 4)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    spec = resolve_model(str(tiny_model_dir("llama")))
    return spec, load_span(spec, *BLOCKS)


def _node(spec, span, tmp_path, mode: str) -> Node:
    identity = Identity.generate()
    return Node(
        NodeConfig(start=BLOCKS[0], end=BLOCKS[1], data_dir=tmp_path, misbehave=mode),
        spec=spec, span=span, transport=MemoryTransport(MemoryNetwork()),
        listen_at=f"mem://{identity.peer_id}", discovery=MemoryDiscovery(MemoryDHT(), identity),
        identity=identity, wallet=Wallet.generate(), ms_per_block=1.0,
    )


def _serve(node: Node, inputs: list[torch.Tensor]) -> list[m.StepResult]:
    """Open a session on ``node`` and run ``inputs`` as its steps; the replies."""

    async def main() -> list[m.StepResult]:
        await node.handle(m.OpenSession(0, "s", node.spec.model_id, *BLOCKS, 64))
        return [await node.handle(m.Step(0, "s", i, x)) for i, x in enumerate(inputs)]

    return asyncio.run(main())


def _inputs(hidden: int, steps: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(1, 6, hidden, generator=gen)] + [
        torch.randn(1, 1, hidden, generator=gen) for _ in range(steps - 1)
    ]


def _honest(span, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    cache = span.new_cache(*BLOCKS)
    return [span.forward(x, cache) for x in inputs]


def test_modes_are_checked_and_the_flag_says_it_is_for_testing():
    for mode in ("", *MODES):
        NodeConfig(misbehave=mode)
    with pytest.raises(ConfigError, match="misbehave mode 'lie' is unknown"):
        NodeConfig(misbehave="lie")
    import typer

    from layerchain.cli.main import app

    start = typer.main.get_command(app).commands["node"].commands["start"]  # type: ignore[attr-defined]
    (flag,) = [p for p in start.params if p.name == "misbehave"]
    assert flag.opts == ["--misbehave"] and "For testing defences only" in flag.help
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["node", "start", "--blocks", "0:2", "--new-swarm",
                                      "--misbehave", "lie"])  # reaches NodeConfig's check
    assert result.exit_code == 1 and "misbehave mode 'lie' is unknown" in result.output


@pytest.mark.parametrize("mode", [*MODES, ""])
def test_each_mode_signs_honest_looking_receipts_for_wrong_outputs(tiny, tmp_path, mode):
    """Every receipt passes ReceiptVerifier.check (signature, chain, hashes, and the
    commitment of what was returned); yet each cheated step, and only those, is above
    AUDIT_TOLERANCE from the honest recomputation. An honest node ("") cheats on none."""
    spec, span = tiny
    node = _node(spec, span, tmp_path, mode)
    if mode == "sometimes":  # a fixed draw: 16 steps, some cheated
        node.misbehavior = Misbehavior(mode, seed=7)
    inputs = _inputs(spec.hidden_size)
    replies = _serve(node, inputs)
    verifier = ReceiptVerifier(node.wallet, "s", spec.model_id, Span(*BLOCKS), 0)
    wrong = []
    for x, reply, honest in zip(inputs, replies, _honest(span, inputs), strict=True):
        receipt = verifier.check(reply.receipt, x, reply.hidden)  # passes: honest-looking
        assert SignedReceipt.from_bytes(reply.receipt).receipt.fingerprint == receipt.fingerprint
        wrong.append(commitment_distance(receipt.fingerprint, honest) > AUDIT_TOLERANCE)
    cheated = 0 if node.misbehavior is None else node.misbehavior.cheated
    assert sum(wrong) == cheated
    expected = {"": 0, "stale": len(inputs) - 1, "sometimes": cheated}.get(mode, len(inputs))
    assert cheated == expected
    if mode == "sometimes":
        assert 0 < cheated < len(inputs) / 2


def test_cheating_spans_leave_the_given_span_untouched(tiny):
    spec, span = tiny
    before = {name: p.clone() for name, p in span.named_parameters()}
    x = torch.randn(1, 3, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    honest = span.forward(x)
    for mode in ("skip", "model"):
        other = cheating_span(mode, span)
        assert other is not span and not torch.equal(other.forward(x), honest)
    assert all(torch.equal(p, before[name]) for name, p in span.named_parameters())
    assert torch.equal(span.forward(x), honest)
    assert cheating_span("noise", span) is span


def test_the_pure_transforms():
    assert list(skipped_blocks(4, 9)) == [4, 6, 8] and list(skipped_blocks(3, 4)) == [3]
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = requantize(w, bits=4, group=32)
    assert q.shape == w.shape and not torch.equal(q, w)
    for group in q.reshape(-1, 32):  # at most 16 levels per group
        assert group.unique().numel() <= 16
    assert torch.equal(requantize(q, bits=4, group=32), q)  # already on the grid
    prev, out = torch.randn(1, 5, 8), torch.randn(1, 1, 8)
    assert torch.equal(replay(prev, out), prev[:, -1:])
    assert replay(out, out) is out
    rate = sum(Misbehavior("sometimes", seed=s).output("s", out) is not out for s in range(400)) / 400
    assert abs(rate - SOMETIMES_RATE) < 0.07
