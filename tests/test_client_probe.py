"""client.probe_nodes: one Info per node, all at once; a silent or absent node is an error line."""

from __future__ import annotations

import asyncio

from layerchain.client import probe_nodes
from layerchain.wire import MemoryNetwork, MemoryTransport
from layerchain.wire import messages as m
from layerchain.wire.rpc import serve_connection


def test_probe_answers_in_order_and_never_raises_for_a_node():
    async def main():
        network = MemoryNetwork()
        transport = MemoryTransport(network)

        async def honest(request: object) -> object:
            return m.InfoReply(rid=getattr(request, "rid", 0), peer_id="p1", model_id="x",
                               start=0, end=4, ms_per_block=1.0, price_per_block=2,
                               free_cache_tokens=64, wallet="", version="0.1.0")

        async def silent(request: object) -> object:
            await asyncio.sleep(60)  # never answers in time
            return None

        good = await transport.listen("mem://good", lambda c: serve_connection(c, honest))
        mute = await transport.listen("mem://mute", lambda c: serve_connection(c, silent))
        t0 = asyncio.get_running_loop().time()
        probes = await probe_nodes(
            [mute.endpoint, "mem://nobody", good.endpoint], timeout_s=0.5, transport=transport
        )
        elapsed = asyncio.get_running_loop().time() - t0
        await good.close()
        await mute.close()
        return probes, elapsed

    (mute, nobody, good), elapsed = asyncio.run(main())
    assert good.info is not None and good.info.peer_id == "p1" and good.error == ""
    assert mute.info is None and "0.5 s" in mute.error
    assert nobody.info is None and nobody.error
    assert elapsed < 2.0  # in parallel, each bounded by the timeout


def test_probes_dial_tls_checking_the_peer_id_and_refuse_plaintext_unless_insecure():
    from layerchain.discovery import Identity
    from layerchain.wire import TcpTransport, TlsTransport

    node = Identity.generate()

    async def info(request: object) -> object:
        return m.InfoReply(rid=getattr(request, "rid", 0), peer_id=node.peer_id, model_id="x",
                           start=0, end=4, ms_per_block=1.0, price_per_block=2,
                           free_cache_tokens=64, wallet="", version="0.1.0")

    async def main():
        tls = await TlsTransport(node).listen("tls://127.0.0.1:0", lambda c: serve_connection(c, info))
        plain = await TcpTransport().listen("tcp://127.0.0.1:0", lambda c: serve_connection(c, info))
        endpoints = [tls.endpoint, tls.endpoint, tls.endpoint, plain.endpoint]
        default = await probe_nodes(endpoints, peer_ids=[node.peer_id, None, "someone", None])
        insecure = await probe_nodes([plain.endpoint], insecure=True)
        await tls.close()
        await plain.close()
        return default, insecure

    (right, anyone, wrong, plaintext), [allowed] = asyncio.run(main())
    assert right.info is not None and anyone.info is not None
    assert wrong.info is None and "is not peer someone" in wrong.error
    assert plaintext.info is None and "--insecure" in plaintext.error
    assert allowed.info is not None and allowed.info.peer_id == node.peer_id
