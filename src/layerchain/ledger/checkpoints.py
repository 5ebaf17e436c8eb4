"""Checkpoints: signed copies of a ledger's journal head, kept outside the ledger file.

The journal is a hash chain, so whoever can write the file can rewrite an entry and
re-hash every entry after it: the chain alone proves nothing against the file's owner.
A checkpoint anchors it: ``(ledger_id, seq, head_hash)`` signed by a wallet and stored
somewhere the file's writers cannot reach (the signer's own data directory). Because each
hash covers every entry before it, a journal whose entry ``seq`` still has the
checkpointed hash has entries ``1..seq`` exactly as they were when the checkpoint was
signed; rewriting any of them is caught, even re-hashed, even with the tables made to
agree. Entries after the last checkpoint are not anchored.

Every writer keeps its own: the ``wallet`` and ``ledger`` commands append one after each
change they make to ``DATA_DIR/checkpoints.jsonl``, a node after each redemption round;
``ledger checkpoint`` takes one on demand. ``ledger verify`` checks the ones it is given.

Canonical bytes (104 bytes)::

    bytes32 CHECKPOINT_TYPEHASH = keccak256("layerchain.Checkpoint.v1")
    bytes32 ledger_id       uint64 seq       bytes32 head_hash

Store format: one JSON line per checkpoint, ``{"seq", "head", "signer", "signed"}`` with
``signed`` the hex wire bytes (msgpack ``[1, ledger_id, seq, head, signature]``); only
``signed`` is trusted, the other fields are for people reading the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import msgpack

from layerchain.errors import LedgerError
from layerchain.ledger.operations import id_bytes
from layerchain.ledger.signatures import BadSignature, Signer, checksum_address, keccak256, recover_address_bytes

CHECKPOINT_TYPEHASH = keccak256(b"layerchain.Checkpoint.v1")
CHECKPOINT_FILE = "checkpoints.jsonl"  # under a data directory
_WIRE_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """The head of ledger ``ledger_id`` after entry ``seq``: that entry's hash."""

    ledger_id: str  # "0x" + 64 hex digits
    seq: int
    head_hash: str  # 64 hex digits, as in the journal

    def canonical_bytes(self) -> bytes:
        return (
            CHECKPOINT_TYPEHASH + id_bytes(self.ledger_id, "ledger id")
            + struct.pack(">Q", self.seq) + bytes.fromhex(self.head_hash)
        )

    def digest(self) -> bytes:
        return keccak256(self.canonical_bytes())


@dataclass(frozen=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    signer: str  # checksummed address recovered from the signature


def sign_checkpoint(signer: Signer, checkpoint: Checkpoint) -> bytes:
    """Wire bytes of ``checkpoint`` signed by ``signer``."""
    c = checkpoint
    signature = signer.sign_digest(c.digest())
    return msgpack.packb([_WIRE_VERSION, id_bytes(c.ledger_id), c.seq,
                          bytes.fromhex(c.head_hash), signature])


def verify_checkpoint(data: bytes) -> SignedCheckpoint:
    """Decode a checkpoint and recover its signer; LedgerError if malformed. Pure."""
    try:
        version, ledger_raw, seq, head, signature = msgpack.unpackb(data, raw=False)
        if version != _WIRE_VERSION or not isinstance(ledger_raw, bytes) or len(ledger_raw) != 32:
            raise ValueError("not a version-1 checkpoint")
        if type(seq) is not int or not 0 < seq < 2**63 or not isinstance(head, bytes) or len(head) != 32:
            raise ValueError("bad seq or head")
        checkpoint = Checkpoint("0x" + ledger_raw.hex(), seq, head.hex())
        signer = recover_address_bytes(checkpoint.digest(), signature)
    except (BadSignature, ValueError, TypeError, msgpack.UnpackException) as error:
        raise LedgerError(f"checkpoint is malformed or badly signed ({error})") from None
    return SignedCheckpoint(checkpoint, checksum_address(signer))


@dataclass(frozen=True)
class Anchoring:
    """What a set of checkpoints proves about a journal."""

    anchored_seq: int  # entries 1..anchored_seq match a valid checkpoint (0: none)
    signers: tuple[str, ...]  # who signed the matching checkpoints
    problems: tuple[str, ...]  # checkpoints the journal contradicts


def check_checkpoints(
    ledger_id: str, hashes: Mapping[int, str], checkpoints: Iterable[bytes]
) -> Anchoring:
    """Compare checkpoints with a journal's ``{seq: hash}``. Pure.

    A checkpoint of another ledger is ignored; one whose entry is missing or has another
    hash is a problem (the journal was rewritten or cut after it was signed)."""
    anchored, signers, problems = 0, set(), []
    for data in checkpoints:
        try:
            signed = verify_checkpoint(data)
        except LedgerError as error:
            problems.append(str(error))
            continue
        c = signed.checkpoint
        if c.ledger_id != ledger_id:
            continue
        have = hashes.get(c.seq)
        if have is None:
            problems.append(
                f"checkpoint signed by {signed.signer} names journal entry {c.seq}, which is "
                "missing (entries removed)"
            )
        elif have != c.head_hash:
            problems.append(
                f"checkpoint signed by {signed.signer} says entry {c.seq} has hash "
                f"{c.head_hash[:16]}…, the journal has {have[:16]}… (entries 1..{c.seq} rewritten)"
            )
        else:
            anchored = max(anchored, c.seq)
            signers.add(signed.signer)
    return Anchoring(anchored, tuple(sorted(signers)), tuple(problems))


class CheckpointStore:
    """Checkpoints as JSON lines in one file, appended to, never rewritten."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    @classmethod
    def for_data_dir(cls, data_dir: str | Path) -> CheckpointStore:
        return cls(Path(data_dir).expanduser() / CHECKPOINT_FILE)

    def append(self, data: bytes) -> None:
        signed = verify_checkpoint(data)
        line = json.dumps({"seq": signed.checkpoint.seq, "head": signed.checkpoint.head_hash,
                           "signer": signed.signer, "signed": data.hex()}, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as handle:  # one write of one line: appends do not interleave
            handle.write(line + "\n")

    def load(self) -> list[bytes]:
        """Every checkpoint in the file; a torn or unreadable line is skipped."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(bytes.fromhex(json.loads(line)["signed"]))
            except (ValueError, KeyError, TypeError):
                continue
        return out
