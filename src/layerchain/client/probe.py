"""Asking nodes what they serve: one ``Info`` call each, all at once, each bounded in time.

What ``layerchain swarm status`` shows an operator. The answers are the nodes' own claims
(``InfoReply``): fit for a status table, never for routing, where the client checks records
and measures peers itself (``peers.PeerView``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from layerchain.errors import LayerchainError, ProtocolError
from layerchain.wire import messages as m
from layerchain.wire.rpc import RpcClient
from layerchain.wire.transport import Dialer, Transport

PROBE_TIMEOUT_S = 3.0  # seconds for one node to accept the connection and answer


@dataclass(frozen=True)
class NodeProbe:
    """One node's answer, or why there was none."""

    endpoint: str  # where it was asked
    info: m.InfoReply | None  # None: no answer (see ``error``)
    error: str = ""  # one line, "" when it answered


async def probe_nodes(
    endpoints: Sequence[str],
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
    transport: Transport | None = None,
    peer_ids: Sequence[str | None] | None = None,
    insecure: bool = False,
) -> list[NodeProbe]:
    """Ask every endpoint for its ``InfoReply``, in parallel; one ``NodeProbe`` per endpoint,
    in order. Never raises for a node: an unreachable, slow or erring one gets its ``error``.

    ``transport``: how to connect (default: a ``Dialer``, TLS; plaintext tcp:// only with
    ``insecure``). ``peer_ids``: the peer id each endpoint must prove over TLS (None or
    absent: any; a wrong one is an ``error``, not an answer).
    """
    dialer = transport or Dialer(insecure=insecure)
    expected = list(peer_ids) if peer_ids is not None else [None] * len(endpoints)

    async def ask(endpoint: str, peer_id: str | None) -> m.InfoReply:
        conn = await dialer.connect(endpoint, peer_id=peer_id)
        rpc = RpcClient(conn)
        try:
            reply = await rpc.call(m.Info(rid=0), timeout=timeout_s)
        finally:
            await rpc.close()
        if not isinstance(reply, m.InfoReply):  # RpcClient checks it already; this tells mypy
            raise ProtocolError(f"{endpoint} answered Info with {type(reply).__name__}")
        return reply

    async def one(endpoint: str, peer_id: str | None) -> NodeProbe:
        try:
            return NodeProbe(endpoint, await asyncio.wait_for(ask(endpoint, peer_id), timeout_s))
        except asyncio.TimeoutError:
            return NodeProbe(endpoint, None, f"no answer within {timeout_s:g} s")
        except (LayerchainError, OSError) as error:
            return NodeProbe(endpoint, None, str(error) or type(error).__name__)

    pairs = zip(endpoints, expected, strict=True)  # ValueError: one peer id per endpoint
    return list(await asyncio.gather(*(one(e, p) for e, p in pairs)))
