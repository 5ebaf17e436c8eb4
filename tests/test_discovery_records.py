"""Node identities and signed peer records: pure functions, no I/O besides a temp dir."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import stat

import msgpack
from eth_utils import is_checksum_address, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from layerchain.discovery.identity import KEY_FILE_NAME, Identity, peer_id_from_public_key, verify
from layerchain.discovery.records import (
    MAX_RECORD_BYTES,
    MAX_RECORD_TTL_S,
    RECORD_FORMAT,
    PeerRecord,
    _encode_fields,
    _is_checksum_address,
    check_endpoint,
    check_fresh,
    open_record,
    sign_record,
    verify_record,
)
from layerchain.errors import ConfigError, ProtocolError
from layerchain.types import Span

NOW = 1_700_000_000.0
WALLET = to_checksum_address("0x" + "ab" * 20)


def make_record(identity: Identity, **changes: object) -> PeerRecord:
    fields = dict(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        endpoints=("tcp://127.0.0.1:4001",),
        model_id="smollm2-135m",
        start=10,
        end=20,
        ms_per_block=1.25,
        price_per_block=3,
        free_cache_tokens=4096,
        wallet=WALLET,
        rtts=(("peerA", 0.4), ("peerB", 12.0)),
        version="0.1.0",
        expires_at=NOW + 60,
    )
    fields.update(changes)
    return PeerRecord(**fields)  # type: ignore[arg-type]


def resign(identity: Identity, values: dict[str, object]) -> bytes:
    """A blob of arbitrary field values, correctly signed by ``identity`` (bypasses checks)."""
    payload = _encode_fields(values)
    return msgpack.packb([payload, identity.sign(payload)], use_bin_type=True)


# ---- identity ----


def test_identity_persists_with_owner_only_permissions(tmp_path):
    first = Identity.load_or_create(tmp_path / "node")
    path = tmp_path / "node" / KEY_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(tmp_path / "node")
    assert again.peer_id == first.peer_id and again.public_key == first.public_key
    assert Identity.generate().peer_id != first.peer_id
    assert first.peer_id == peer_id_from_public_key(first.public_key)
    assert 16 <= len(first.peer_id) <= 24


def test_identity_signs_and_verifies():
    me, other = Identity.generate(), Identity.generate()
    sig = me.sign(b"hello")
    assert verify(me.public_key, sig, b"hello")
    assert Identity.verify(me.public_key, sig, b"hello")
    assert not verify(me.public_key, sig, b"hellO")
    assert not verify(other.public_key, sig, b"hello")
    assert not verify(me.public_key[:5], sig, b"hello")
    assert not verify(me.public_key, sig[:-1], b"hello")


def test_identity_refuses_world_readable_or_garbage_key(tmp_path):
    Identity.load_or_create(tmp_path)
    path = tmp_path / KEY_FILE_NAME
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="accessible by other users"):
        Identity.load_or_create(tmp_path)
    path.write_bytes(b"not a key")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="not a PEM private key"):
        Identity.load_or_create(tmp_path)


# ---- records ----


def test_sign_verify_round_trip():
    me = Identity.generate()
    record = make_record(me)
    blob = sign_record(me, record)
    assert verify_record(blob, NOW) == record
    assert record.span == Span(10, 20)
    assert list(record.blocks) == list(range(10, 20))
    built = PeerRecord.create(
        me, model_id="smollm2-135m", span=Span(10, 20), endpoint="tcp://127.0.0.1:4001",
        ms_per_block=1.25, price_per_block=3, free_cache_tokens=4096, wallet=WALLET,
        rtts=(("peerA", 0.4), ("peerB", 12.0)), version="0.1.0", expires_at=NOW + 60,
    )  # fmt: skip
    assert built == record
    # Equal records have equal bytes, whatever numeric types built them.
    assert make_record(me, ms_per_block=2, expires_at=int(NOW)).canonical_bytes() == make_record(
        me, ms_per_block=2.0, expires_at=NOW // 1
    ).canonical_bytes()


def test_tampered_field_is_rejected():
    me = Identity.generate()
    payload, sig = msgpack.unpackb(sign_record(me, make_record(me)))
    body = msgpack.unpackb(payload)
    body["price_per_block"] = 0  # a cheaper price than the peer signed
    forged = msgpack.packb([_encode_fields(body), sig], use_bin_type=True)
    with pytest.raises(ProtocolError, match="bad signature"):
        open_record(forged)
    # Flipping one bit of the signature is caught as well.
    bad_sig = msgpack.packb([payload, bytes([sig[0] ^ 1]) + sig[1:]], use_bin_type=True)
    with pytest.raises(ProtocolError, match="bad signature"):
        verify_record(bad_sig, NOW)


def test_wrong_key_is_rejected():
    me, mallory = Identity.generate(), Identity.generate()
    with pytest.raises(ProtocolError, match="cannot sign"):
        sign_record(mallory, make_record(me))
    # Mallory signs a record that claims to be mine: the signature does not match my key.
    values = dataclasses.asdict(make_record(me))
    with pytest.raises(ProtocolError, match="bad signature"):
        open_record(resign(mallory, values))


def test_peer_id_not_matching_key_is_rejected():
    me, victim = Identity.generate(), Identity.generate()
    values = dataclasses.asdict(make_record(me))
    values["peer_id"] = victim.peer_id  # my key, correctly signed, but the victim's id
    with pytest.raises(ProtocolError, match="does not match its public key"):
        open_record(resign(me, values))
    with pytest.raises(ProtocolError, match="does not match"):
        make_record(me, peer_id=victim.peer_id)


def test_expired_record_is_rejected():
    me = Identity.generate()
    blob = sign_record(me, make_record(me, expires_at=NOW))
    with pytest.raises(ProtocolError, match="expired"):
        verify_record(blob, NOW)
    assert open_record(blob).expires_at == NOW  # signature itself is fine
    assert verify_record(blob, NOW - 1).expires_at == NOW
    with pytest.raises(ProtocolError, match="expired"):
        check_fresh(open_record(blob), NOW + 100)


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\xc1garbage",
        msgpack.packb([b"x"]),
        msgpack.packb([b"x", b"y", b"z"]),
        msgpack.packb({"a": 1}),
        msgpack.packb([msgpack.packb({"format": "other"}), b"s" * 64]),
        msgpack.packb(["text", b"s" * 64]),
        b"\x00" * (MAX_RECORD_BYTES + 1),
    ],
)
def test_malformed_blobs_are_rejected(blob):
    with pytest.raises(ProtocolError):
        open_record(blob)


def test_malformed_fields_are_rejected_even_if_signed():
    me = Identity.generate()
    good = dataclasses.asdict(make_record(me))
    for change in [
        {"start": 5, "end": 5},
        {"start": -1},
        {"price_per_block": 1.5},
        {"ms_per_block": float("nan")},
        {"model_id": ""},
        {"endpoints": ["x" * 1000]},
        {"rtts": [["p", -1.0]]},
        {"free_cache_tokens": True},
    ]:
        with pytest.raises(ProtocolError, match="malformed"):
            open_record(resign(me, {**good, **change}))
    extra = {**good, "bonus": 1}
    with pytest.raises(ProtocolError, match="wrong set of fields"):
        open_record(resign(me, extra))


def test_non_canonical_encoding_is_rejected():
    me = Identity.generate()
    body = {"format": RECORD_FORMAT, **dataclasses.asdict(make_record(me))}
    body["rtts"] = [list(p) for p in body["rtts"]]
    payload = msgpack.packb(dict(reversed(list(body.items()))), use_bin_type=True)  # unsorted keys
    blob = msgpack.packb([payload, me.sign(payload)], use_bin_type=True)
    with pytest.raises(ProtocolError, match="not canonically encoded"):
        open_record(blob)


@pytest.mark.parametrize(
    "change",
    [
        {"endpoints": ["tcp://:4001"]},  # empty host
        {"endpoints": ["tcp://127.0.0.1:0"]},  # port 0
        {"endpoints": ["tcp://127.0.0.1:70000"]},  # port past 65535
        {"endpoints": ["tcp://127.0.0.1"]},  # no port
        {"endpoints": ["http://127.0.0.1:80"]},  # another scheme
        {"endpoints": ["tcp://[link=https://evil]x[/link]:80"]},  # markup, not a host
        {"endpoints": ["tcp://host name:80"]},
        {"endpoints": ["mem://"]},
        {"endpoints": ["tcp://0.0.0.0:4001"]},  # a listener's wildcard: nobody can dial it
        {"endpoints": ["tls://[::]:4001"]},
        {"endpoints": ["tls://[0:0::0]:4001"]},
        {"endpoints": ["tcp://0:4001"]},  # what the resolver reads as 0.0.0.0
        {"endpoints": ["tls://127.1:4001"]},  # ... as 127.0.0.1
        {"endpoints": ["tls://0x7f.1:4001"]},
        {"endpoints": ["tls://2130706433:4001"]},
        {"endpoints": ["relay://10.0.0.1:4001/not-a-peer-id!"]},
        {"endpoints": ["relay://10.0.0.1:4001"]},  # whom to reach through it?
        {"endpoints": [f"tls://10.0.0.{i}:4001" for i in range(5)]},  # more than 4
        {"endpoints": ["tls://10.0.0.1:4001", "tls://10.0.0.1:4001"]},  # twice the same
        {"endpoints": ["tls://10.0.0.1:4001", "tls://" + "a" * 250 + ":4001"]},  # > 256 chars
        {"endpoints": "tls://10.0.0.1:4001"},  # a string, not a list
        {"endpoints": [4001]},
        {"relay": 1},  # booleans only
        {"ms_per_block": 1e308},  # finite, but steers the planner out of the model
        {"ms_per_block": 0.0},  # "infinitely fast": wins every route
        {"price_per_block": 10**18},
        {"free_cache_tokens": 2**40},
        {"rtts": [["p", 1e300]]},
        {"wallet": "0x" + "ab" * 20},  # not checksummed
        {"wallet": "0x1234"},  # not 20 bytes
        {"wallet": "alice"},
        {"version": "0.1\x1b[31m"},  # a terminal escape
        {"model_id": "m\n"},
    ],
)
def test_every_field_is_range_checked_even_if_signed(change):
    me = Identity.generate()
    good = dataclasses.asdict(make_record(me))
    assert open_record(resign(me, good)) == make_record(me)
    with pytest.raises(ProtocolError, match="malformed"):
        open_record(resign(me, {**good, **change}))
    with pytest.raises(ProtocolError, match="malformed"):  # nor can a node build one
        make_record(me, **{k: tuple(map(tuple, v)) if k == "rtts" else v
                           for k, v in change.items()})


def test_a_record_lists_its_endpoints_in_order_and_endpoint_is_the_first():
    me = Identity.generate()
    relay = f"relay://203.0.113.9:4001/{Identity.generate().peer_id}"
    several = ("tls://192.168.1.7:31337", "tls://[fd00::7]:31337", relay, "tcp://node.lan:1")
    record = make_record(me, endpoints=several, relay=True)
    assert open_record(sign_record(me, record)) == record  # order and the relay flag signed
    assert record.endpoints == several and record.endpoint == "tls://192.168.1.7:31337"
    swapped = dataclasses.asdict(record) | {"endpoints": list(reversed(several))}
    payload, signature = msgpack.unpackb(sign_record(me, record))
    forged = msgpack.packb([_encode_fields(swapped), signature], use_bin_type=True)
    with pytest.raises(ProtocolError, match="bad signature"):  # nobody reorders them
        open_record(forged)
    with pytest.raises(ProtocolError, match="endpoint or endpoints"):
        PeerRecord.create(me, model_id="m", span=Span(0, 1), ms_per_block=1.0)


def test_a_format_1_record_is_refused_as_unknown():
    me = Identity.generate()
    values = dataclasses.asdict(make_record(me))
    old = {k: v for k, v in values.items() if k not in ("endpoints", "relay")}
    old["endpoint"] = "tcp://127.0.0.1:4001"
    payload = msgpack.packb({"format": "layerchain/peer-record/1", **old}, use_bin_type=True)
    with pytest.raises(ProtocolError, match="unknown format"):
        open_record(msgpack.packb([payload, me.sign(payload)], use_bin_type=True))


def test_endpoints_that_are_allowed():
    me = Identity.generate()
    for endpoint in ("tcp://127.0.0.1:1", "tcp://node-7.example.org:65535", "tcp://[::1]:4001",
                     "tls://10.1.2.3:4001", "tls://[2001:db8::1]:443",
                     f"relay://relay.example.org:4001/{Identity.generate().peer_id}",
                     "mem://node-a", "mem://3xQvK_9.peer"):
        assert make_record(me, endpoints=(endpoint,)).endpoint == endpoint


def test_a_record_expiring_far_in_the_future_is_refused():
    me = Identity.generate()
    fifty_years = make_record(me, expires_at=NOW + 50 * 365 * 86400)
    with pytest.raises(ProtocolError, match="from now"):
        verify_record(sign_record(me, fifty_years), NOW)
    with pytest.raises(ProtocolError, match="from now"):
        check_fresh(make_record(me, expires_at=NOW + MAX_RECORD_TTL_S + 1), NOW)
    assert check_fresh(make_record(me, expires_at=NOW + MAX_RECORD_TTL_S), NOW)


def test_a_tombstone_carries_no_values():
    from layerchain.discovery.base import tombstone

    me = Identity.generate()
    dead = tombstone(me, "smollm2-135m", 0, 4, NOW + 1)
    assert open_record(sign_record(me, dead)) == dead
    values = dataclasses.asdict(dead)
    with pytest.raises(ProtocolError, match="tombstone"):
        open_record(resign(me, {**values, "price_per_block": 5}))
    with pytest.raises(ProtocolError, match="tombstone"):  # nor offers to relay
        open_record(resign(me, {**values, "relay": True}))


# ---- endpoints: whatever a peer writes, the check answers ProtocolError or a dialable one --

_PIECES = st.sampled_from(["tls://", "tcp://", "relay://", "mem://", "[", "]", ":", "/", "::",
                           "0.0.0.0", "127.0.0.1", "fd00::7", "node.lan", "65535", "0", "99999",
                           "3xQvK9TJm2Wn8pLr5sAaB", "%eth0", " ", "\x00", "é"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=8).map("".join) | st.text(max_size=300))
def test_check_endpoint_refuses_with_a_protocol_error_or_returns_something_dialable(text):
    from layerchain.wire.tcp import parse_tcp_endpoint

    try:
        assert check_endpoint(text) == text
    except ProtocolError:
        return
    scheme = text.split("://", 1)[0]
    if scheme in ("tls", "tcp"):
        host, port = parse_tcp_endpoint(text, scheme)  # the transports read it back
        assert 1 <= port <= 65535
        if ":" in host:
            assert not ipaddress.ip_address(host).is_unspecified
        else:
            try:
                packed = socket.inet_aton(host)  # how the resolver reads a numeric host
            except OSError:
                packed = None  # a DNS name
            if packed is not None:  # it dials exactly the address written, not the wildcard
                assert socket.inet_ntoa(packed) == host != "0.0.0.0"
    else:
        assert scheme in ("mem", "relay")


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(min_size=20, max_size=20), flip=st.integers(0, 39),
       form=st.sampled_from(["checksummed", "lower", "upper", "flipped", "0X", "short", "long"]))
def test_the_wallet_checksum_check_answers_as_eth_utils(raw, flip, form):
    """The record's own EIP-55 check (no eth_utils import on a client's path) says what
    eth_utils says, for checksummed addresses, other cases of the same digits and junk."""
    text = to_checksum_address(raw)
    if form == "lower":
        text = text.lower()
    elif form == "upper":
        text = "0x" + text[2:].upper()
    elif form == "flipped":  # one digit's case changed (a no-op on a digit 0-9)
        c = text[2 + flip]
        text = text[: 2 + flip] + (c.lower() if c.isupper() else c.upper()) + text[3 + flip:]
    elif form == "0X":
        text = "0X" + text[2:]
    elif form == "short":
        text = text[:-1]
    elif form == "long":
        text = text + "a"
    assert _is_checksum_address(text) == is_checksum_address(text)


def test_the_wallet_checksum_check_refuses_what_is_not_text():
    assert not _is_checksum_address(None)
    assert not _is_checksum_address(b"0x" + b"ab" * 20)
    assert not _is_checksum_address("0x" + "g" * 40)
