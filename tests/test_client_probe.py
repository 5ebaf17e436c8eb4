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
