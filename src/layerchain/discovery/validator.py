"""The entry rule of ``base.check_entry``, plugged into hivemind as a record validator.

Every layerchain DHT node runs it (``HivemindDiscovery.create`` installs it), so the rule
holds on store *and* on read: hivemind calls ``validate`` when a peer asks us to store an
entry and when a peer returns a dictionary to our search (one bad sub-key discards that
peer's whole answer). The effect: nobody can overwrite another peer's entry, or replay its
old record with a longer life, on an honest node; and a malicious replica's answers are
ignored by readers.

Scope: only sub-keys shaped like layerchain peer ids (``base.looks_like_peer_id``) are
checked, so other users of the same DHT (e.g. ``hivemind.Optimizer``, whose sub-keys are
bytes) are unaffected. Hivemind hashes keys before validators see them, so a *regular*
(sub-key-less) value stored under a block key with a later expiration can still replace
that key's dictionary on a node; readers then see no peers for that block until it
expires. Closing that needs a hivemind change (validators that see the raw key).
"""

from __future__ import annotations

from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils.serializer import MSGPackSerializer

from layerchain.discovery.base import check_entry, looks_like_peer_id


class PeerRecordValidator(RecordValidatorBase):
    """Accept an entry under a peer-id sub-key only if it passes ``check_entry``."""

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey in DHTProtocol.RESERVED_SUBKEYS:
            return True  # a regular value or a whole dictionary (checked per sub-key)
        try:
            sub_key = MSGPackSerializer.loads(record.subkey)
        except Exception:
            return True  # not a msgpack sub-key: not ours
        if not looks_like_peer_id(sub_key):
            return True
        try:
            check_entry(sub_key, MSGPackSerializer.loads(record.value), record.expiration_time)
        except Exception:  # ProtocolError, or a value msgpack cannot even decode
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, PeerRecordValidator)  # one instance is enough
