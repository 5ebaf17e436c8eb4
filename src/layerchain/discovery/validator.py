"""The entry rule of ``base.check_entry``, plugged into hivemind as a record validator.

Every layerchain DHT node runs it (``HivemindDiscovery.create`` installs it), so the rule
holds on store *and* on read: hivemind calls ``validate`` when a peer asks us to store an
entry and when a peer returns a value to our search (one bad sub-key discards that peer's
whole answer). The effect: nobody can overwrite another peer's entry, replay its old
record with a longer life, or park junk on an honest node; and a malicious replica's
answers are ignored by readers.

A layerchain DHT holds layerchain peer records and catalog entries (``catalog.py``) and
nothing else (``validate``):

* a *regular* value (no sub-key) is refused. Hivemind hashes keys before validators see
  them, so the validator cannot tell a block key from another; refusing every regular
  value is what keeps one from replacing a block key's dictionary of records;
* a sub-key must be a layerchain peer id (``base.looks_like_peer_id``) and its value a
  signed record (or catalog entry) of that peer within its caps, expiring when the entry
  does and at most ``records.MAX_RECORD_TTL_S`` from now (on this node's clock);
  ``catalog.check_stored_entry``: a catalog entry whose model id is not its manifest's
  hash is refused here already;
* a value larger than ``MAX_ENTRY_BYTES`` is refused before it is decoded.

So the DHT cannot be shared with other hivemind applications (``hivemind.Optimizer``
stores regular values and bytes sub-keys): run those on a DHT of their own.
"""

from __future__ import annotations

import layerchain.discovery._hivemind  # noqa: F401 - first: hivemind's own __init__ stays lazy
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.serializer import MSGPackSerializer

from layerchain.discovery.catalog import MAX_CATALOG_BYTES, check_stored_entry
from layerchain.discovery.records import MAX_RECORD_BYTES

#: A stored value is msgpack of the record blob: the blob plus a few bytes of header.
MAX_ENTRY_BYTES = max(MAX_RECORD_BYTES, MAX_CATALOG_BYTES) + 16


def entry_is_valid(record: DHTRecord, now: float) -> bool:
    """Pure: whether a layerchain DHT node may store (or believe) ``record`` at ``now``."""
    if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
        return False  # a regular value: layerchain stores only sub-keyed peer records
    if len(record.value) > MAX_ENTRY_BYTES or len(record.subkey) > 64:
        return False
    try:
        sub_key = MSGPackSerializer.loads(record.subkey)
        check_stored_entry(sub_key, MSGPackSerializer.loads(record.value),
                           record.expiration_time, now)
    except Exception:  # ProtocolError, or bytes msgpack cannot even decode
        return False
    return True


class PeerRecordValidator(RecordValidatorBase):
    """Accept an entry only if it is a layerchain peer record (``entry_is_valid``)."""

    def validate(self, record: DHTRecord) -> bool:
        return entry_is_valid(record, get_dht_time())

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, PeerRecordValidator)  # one instance is enough
