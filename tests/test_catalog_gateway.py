"""The gateway's ``/v1/models`` lists what the swarm's catalog lists (issue 20.2), in-process.

Two memory nodes serve the gateway's tiny model (0:2, 2:4); the catalog also lists a model
the gateway cannot serve (``available: false``, named by its name) and one whose name is the
gateway's own model's (named by its id, so ids stay unique).
"""

from __future__ import annotations

import asyncio

from gateway_harness import memory_gateway
from test_catalog import entry_of, manifest

from layerchain.discovery import Identity, MemoryDiscovery
from layerchain.discovery.catalog import CATALOG_KEY, sign_entry
from layerchain.model.manifest import manifest_of


def test_v1_models_lists_the_swarms_catalog(tiny_model_dir, tmp_path, record_for):
    model = str(tiny_model_dir("llama", tokenizer=True))

    async def main() -> dict:
        async with memory_gateway(model, tmp_path) as (client, gateway):
            hub = gateway.swarm.discovery.hub
            own = manifest_of(gateway.spec)
            other = manifest("beta", 2, seed=7)
            clash = manifest(gateway.spec.name, 3, seed=8)
            for body, span in ((own, None), (other, (0, 1)), (clash, None)):
                me = Identity.generate()
                entry = entry_of(me, body)
                discovery = MemoryDiscovery(hub, me)
                assert await discovery.put_entry(CATALOG_KEY, sign_entry(me, entry),
                                                 entry.expires_at)
                if span is not None:
                    await discovery.announce(record_for(me, *span, model_id=entry.model_id))
            reply = await client.get("/v1/models")
            assert reply.status_code == 200, reply.text
            one = (await client.get("/v1/models/beta")).json()  # a catalog row, by name
            assert (one["id"], one["available"]) == ("beta", False)
            assert (await client.get(f"/v1/models/{gateway.spec.name}")).json()["available"]
            assert (await client.get("/v1/models/nowhere")).status_code == 404
            return {"data": reply.json()["data"], "own": own, "other": other, "clash": clash}

    got = asyncio.run(asyncio.wait_for(main(), 120))
    own, *rest = got["data"]
    assert own["available"] is True and own["object"] == "model"
    assert own["layerchain"]["model_id"] == got["own"]["model_id"]
    assert own["layerchain"]["replicas"] == [1, 1, 1, 1]  # the two memory nodes, from the DHT
    assert own["layerchain"]["servers"] == 2 and own["layerchain"]["blocks_served"] == 4
    by_model = {row["layerchain"]["model_id"]: row for row in rest}
    beta = by_model[got["other"]["model_id"]]
    assert (beta["id"], beta["available"], beta["owned_by"]) == ("beta", False, "layerchain")
    assert beta["layerchain"]["replicas"] == [1, 0] and beta["layerchain"]["servers"] == 1
    clash = by_model[got["clash"]["model_id"]]
    assert clash["id"] == got["clash"]["model_id"] and clash["available"] is False
    assert len({row["id"] for row in got["data"]}) == 3
