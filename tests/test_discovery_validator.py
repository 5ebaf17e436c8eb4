"""The hivemind record validator: a layerchain DHT node stores peer records and nothing else.

Pure calls of ``entry_is_valid`` on ``DHTRecord`` values, no DHT process (fast).
"""

from __future__ import annotations

import time
import warnings

from layerchain.discovery import Identity, PeerRecord, sign_record
from layerchain.discovery.records import MAX_RECORD_TTL_S

with warnings.catch_warnings():  # importing hivemind runs torch.jit.script, deprecated in torch
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils.serializer import MSGPackSerializer as S

    from layerchain.discovery.validator import (
        MAX_ENTRY_BYTES,
        PeerRecordValidator,
        entry_is_valid,
    )

KEY = b"k" * 20  # hivemind hands validators hashed keys


def _record(identity: Identity, expires_at: float) -> PeerRecord:
    return PeerRecord(
        peer_id=identity.peer_id, public_key=identity.public_key,
        endpoints=("tcp://127.0.0.1:4001",), model_id="m", start=0, end=4, ms_per_block=1.0,
        price_per_block=1, free_cache_tokens=1024, wallet="", rtts=(), version="0.1.0",
        expires_at=expires_at,
    )


def _entry(sub_key: object, value: object, expiration: float) -> DHTRecord:
    return DHTRecord(KEY, S.dumps(sub_key), S.dumps(value), expiration)


def test_a_signed_record_under_its_peer_id_is_accepted():
    me, now = Identity.generate(), time.time()
    blob = sign_record(me, _record(me, now + 60))
    assert entry_is_valid(_entry(me.peer_id, blob, now + 60), now)
    assert PeerRecordValidator().validate(_entry(me.peer_id, blob, now + 60))


def test_junk_is_refused_whatever_its_shape():
    me, now = Identity.generate(), time.time()
    blob = sign_record(me, _record(me, now + 60))
    junk = [
        DHTRecord(KEY, S.dumps(None), S.dumps("plain"), now + 60),  # a regular value
        DHTRecord(KEY, S.dumps(None), S.dumps(blob), now + 60),  # even one holding a record
        _entry(b"optimizer-subkey", b"anything", now + 60),  # a foreign sub-key
        _entry("not a peer id!", blob, now + 60),
        _entry(me.peer_id, b"x" * (MAX_ENTRY_BYTES + 1), now + 60),  # oversized
        DHTRecord(KEY, S.dumps(me.peer_id), b"\xc1", now + 60),  # not msgpack
        _entry(me.peer_id, "text", now + 60),
    ]
    for record in junk:
        assert not entry_is_valid(record, now), record


def test_a_record_expiring_too_far_ahead_is_refused():
    me, now = Identity.generate(), time.time()
    far = now + MAX_RECORD_TTL_S + 5
    blob = sign_record(me, _record(me, far))
    assert not entry_is_valid(_entry(me.peer_id, blob, far), now)
    assert entry_is_valid(_entry(me.peer_id, blob, far), now + 10)  # fine once time caught up
