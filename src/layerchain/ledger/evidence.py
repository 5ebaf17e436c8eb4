"""Evidence of cheating: what a client hands the ledger to slash a node's stake.

A node signs a receipt for every step it computes, and the receipt carries a commitment to
the hidden states it returned (``market/commitment.py``: a few bytes per token). When an
audit finds a step whose output the model does not reproduce, the client packs

* the accused node's signed receipts of steps ``0..k`` of one session on one hop (the hash
  chain proves they belong together, the signatures that the node made them),
* the hop's inputs of those steps (their sha256 must be the receipts' ``input_sha256``),
* what the referee computed for step ``k`` (informative: nobody has to trust it),
* and signs the whole as the accuser.

Anyone holding the model checks it (``check_evidence``) by running the same blocks over
the same inputs, step by step in the same partition (a node does exactly this, so the KV
cache at step ``k`` is the node's), and comparing the output of step ``k`` with the
commitment the node signed. Guilty only if every signature and chain link holds and the
distance exceeds ``AUDIT_TOLERANCE`` (set from the measured honest distribution, which
covers other thread counts and CPUs). Evidence whose signatures or chain do not hold, or
which accuses an honest output, is a false accusation: the ledger takes the accuser's
bond (``ledger/journal.py``, kind ``slash``).

The accuser signs (EIP-191) ``keccak256`` of (Solidity ``abi.encodePacked``)::

    bytes32 EVIDENCE_TYPEHASH = keccak256("layerchain.Evidence.v1")
    bytes32 keccak256(model_id)    uint32 start, uint32 end     uint64 step
    bytes32 keccak256(keccak256(receipt_0) || ... || keccak256(receipt_k))
    bytes32 keccak256(tensor_sha256(input_0) || ... || tensor_sha256(input_k))
    bytes32 keccak256(referee_commitment)   bytes32 keccak256(referee_receipt)
    address accuser

which is also the evidence's id (``evidence_hash``) in the ledger's journal.

File format (``.evidence``): a safetensors file. Tensors ``input.0`` .. ``input.k`` are the
hop inputs ``[1, T_i, H]`` in the dtype they were sent (their sha256 covers the dtype);
the metadata key ``layerchain.evidence`` holds JSON ``{"version": 1, "model_id",
"model_name", "start", "end", "step", "receipts": [hex], "referee_commitment": hex,
"referee_receipt": hex, "accuser", "signature": hex}``. Size: the inputs dominate, 4 bytes
x hidden size per token of the session up to step k (float32 on a 576-wide model: 2.3 KiB a
token: 246 KiB for a 30-token prompt and 64 generated tokens, receipts included).

This module knows nothing of peers or networks; the ledger calls nothing here (it records
verdicts), so a ledger opens without torch.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from layerchain.errors import (
    FalseAccusation,
    InsufficientFunds,
    InvalidEvidence,
    InvalidOutput,
    InvalidReceipt,
    LedgerError,
    SpanError,
)
from layerchain.ledger.base import EvidenceVerdict, Ledger, SlashResult
from layerchain.ledger.journal import receipt_signer
from layerchain.ledger.signatures import (
    BadSignature,
    Signer,
    address_bytes,
    checksum_address,
    keccak256,
    recover_address_bytes,
)
from layerchain.market.receipts import (
    ZERO_HASH,
    SignedReceipt,
    receipt_hash,
    tensor_sha256,
    tokens_of,
    verify_receipt,
)
from layerchain.types import Span

if TYPE_CHECKING:
    from layerchain.model.span import SpanModel

__all__ = [
    "EVIDENCE_VERSION",
    "Evidence",
    "EvidenceVerdict",
    "SlashResult",
    "check_evidence",
    "make_evidence",
    "submit_evidence",
]

EVIDENCE_TYPEHASH = keccak256(b"layerchain.Evidence.v1")
EVIDENCE_VERSION = 1
METADATA_KEY = "layerchain.evidence"
MAX_EVIDENCE_STEPS = 1 << 16  # receipts in one piece of evidence (a session's steps)
_PACKED = struct.Struct(">32s32sIIQ32s32s32s32s20s")


@dataclass(frozen=True, eq=False)
class Evidence:
    """An accusation: the accused's receipts and inputs of steps ``0..step`` of one session
    on one hop, signed by ``accuser``. See the module docstring for the signed layout."""

    model_id: str  # hex sha256 of the weights (the receipts' model_id)
    start: int  # first block of the hop
    end: int  # one past its last block
    step: int  # the disputed step k
    receipts: tuple[bytes, ...]  # SignedReceipt wire bytes of steps 0..k, in order
    inputs: tuple[torch.Tensor, ...] = field(repr=False)  # hop inputs [1, T_i, H] of steps 0..k
    accuser: str  # checksummed address that signs the evidence
    signature: bytes = b""  # accuser's 65-byte EIP-191 signature over digest()
    referee_commitment: bytes = b""  # informative: the referee's commitment of step k
    referee_receipt: bytes = b""  # informative: the referee's signed receipt, if a peer
    model_name: str = ""  # informative: a name to resolve the model by ("smollm2")

    def __post_init__(self) -> None:
        count = len(self.receipts)
        if not 0 < count <= MAX_EVIDENCE_STEPS or count != len(self.inputs):
            raise InvalidEvidence(
                f"evidence needs one receipt and one input per step 0..k (at most "
                f"{MAX_EVIDENCE_STEPS}), got {count} receipts and {len(self.inputs)} inputs"
            )
        if self.step != count - 1:
            raise InvalidEvidence(f"evidence disputes step {self.step} but holds steps 0..{count - 1}")
        if not 0 <= self.start < self.end < 2**32:
            raise InvalidEvidence(f"evidence span {self.start}:{self.end} is empty or out of range")
        for x in self.inputs:
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 1:
                raise InvalidEvidence("every evidence input must be a tensor [1, tokens, hidden]")
        try:
            address_bytes(self.accuser)
        except ValueError:
            raise InvalidEvidence(f"evidence accuser {self.accuser!r} is not an address") from None
        for name in ("signature", "referee_commitment", "referee_receipt"):
            if not isinstance(getattr(self, name), bytes):
                raise InvalidEvidence(f"evidence {name} must be bytes")
        if not all(isinstance(r, bytes) for r in self.receipts):
            raise InvalidEvidence("evidence receipts must be bytes")

    def digest(self) -> bytes:
        """keccak256 of the canonical bytes: what the accuser signs and the evidence's id."""
        return keccak256(
            _PACKED.pack(
                EVIDENCE_TYPEHASH,
                keccak256(self.model_id.encode()),
                self.start,
                self.end,
                self.step,
                keccak256(b"".join(keccak256(r) for r in self.receipts)),
                keccak256(b"".join(tensor_sha256(x) for x in self.inputs)),
                keccak256(self.referee_commitment),
                keccak256(self.referee_receipt),
                address_bytes(self.accuser),
            )
        )

    @property
    def evidence_hash(self) -> str:
        """``0x`` + hex of ``digest()``: the id the ledger records (a receipt convicts once)."""
        return "0x" + self.digest().hex()

    def signed_by_accuser(self) -> bool:
        """True when ``signature`` is the accuser's over ``digest()``."""
        try:
            return recover_address_bytes(self.digest(), self.signature) == address_bytes(self.accuser)
        except BadSignature:
            return False

    def to_file(self, path: str | Path) -> Path:
        """Write the evidence as a safetensors file (see the module docstring); return it."""
        from safetensors.torch import save_file

        meta = {
            "version": EVIDENCE_VERSION,
            "model_id": self.model_id,
            "model_name": self.model_name,
            "start": self.start,
            "end": self.end,
            "step": self.step,
            "receipts": [r.hex() for r in self.receipts],
            "referee_commitment": self.referee_commitment.hex(),
            "referee_receipt": self.referee_receipt.hex(),
            "accuser": self.accuser,
            "signature": self.signature.hex(),
        }
        tensors = {f"input.{i}": x.detach().cpu().contiguous() for i, x in enumerate(self.inputs)}
        path = Path(path)
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
        return path

    @classmethod
    def from_file(cls, path: str | Path) -> Evidence:
        """Read an evidence file; InvalidEvidence if it is not one (the signature is checked
        by ``check_evidence``, not here)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[METADATA_KEY])
                if meta.get("version") != EVIDENCE_VERSION:
                    raise ValueError(f"version {meta.get('version')!r}, not {EVIDENCE_VERSION}")
                count = len(meta["receipts"])
                if count > MAX_EVIDENCE_STEPS or set(f.keys()) != {f"input.{i}" for i in range(count)}:
                    raise ValueError("its tensors are not input.0 .. input.k, one per receipt")
                inputs = tuple(f.get_tensor(f"input.{i}") for i in range(count))
            return cls(
                model_id=_str(meta["model_id"]),
                model_name=_str(meta.get("model_name", "")),
                start=_int(meta["start"]),
                end=_int(meta["end"]),
                step=_int(meta["step"]),
                receipts=tuple(bytes.fromhex(_str(r)) for r in meta["receipts"]),
                inputs=inputs,
                referee_commitment=bytes.fromhex(_str(meta["referee_commitment"])),
                referee_receipt=bytes.fromhex(_str(meta["referee_receipt"])),
                accuser=_str(meta["accuser"]),
                signature=bytes.fromhex(_str(meta["signature"])),
            )
        except InvalidEvidence:
            raise
        except FileNotFoundError:
            raise InvalidEvidence(f"no evidence file at {path}") from None
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as error:
            raise InvalidEvidence(f"{path} is not a layerchain evidence file ({error})") from None


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def make_evidence(
    accuser: Signer,
    *,
    model_id: str,
    start: int,
    end: int,
    receipts: tuple[bytes, ...] | list[bytes],
    inputs: tuple[torch.Tensor, ...] | list[torch.Tensor],
    referee_commitment: bytes = b"",
    referee_receipt: bytes = b"",
    model_name: str = "",
) -> Evidence:
    """Evidence disputing the last of ``receipts`` (steps ``0..k`` of one hop's session, with
    the inputs the client sent for them), signed by ``accuser``."""
    unsigned = Evidence(
        model_id=model_id, start=start, end=end, step=len(receipts) - 1,
        receipts=tuple(receipts), inputs=tuple(inputs),
        accuser=checksum_address(address_bytes(accuser.address)),
        referee_commitment=referee_commitment, referee_receipt=referee_receipt,
        model_name=model_name,
    )
    return replace(unsigned, signature=accuser.sign_digest(unsigned.digest()))


def _chain_problem(evidence: Evidence) -> tuple[str, str]:
    """``(accused, problem)``: the node that signed the receipts and what is wrong with the
    chain ("" if nothing). Checks every signature, link, hash and count. Pure, no model."""
    try:
        first = SignedReceipt.from_bytes(evidence.receipts[0]).receipt
    except InvalidReceipt as error:
        return "", f"receipt of step 0: {error}"
    accused, session = first.node_address, first.session_id
    prev = ZERO_HASH
    for i, (data, x) in enumerate(zip(evidence.receipts, evidence.inputs, strict=True)):
        try:
            claimed = SignedReceipt.from_bytes(data).receipt  # its own hashes and price
            r = verify_receipt(
                data, expected_node_address=accused, session_id=session, expected_step=i,
                input_sha256=tensor_sha256(x), output_sha256=claimed.output_sha256,
                prev_hash=prev, price_per_block=claimed.price_per_block,
                model_id=evidence.model_id, span=Span(evidence.start, evidence.end),
                tokens=tokens_of(x),
            )
        except InvalidReceipt as error:
            return accused, f"receipt of step {i}: {error}"
        prev = receipt_hash(r)
    return accused, ""


def _signed_by(receipt: bytes, address: str) -> bool:
    """Whether ``receipt`` (wire bytes) is validly signed by the node ``address`` it names."""
    try:
        return bool(address) and receipt_signer(receipt.hex())[0] == address
    except LedgerError:
        return False


def check_evidence(evidence: Evidence, span: SpanModel) -> EvidenceVerdict:
    """Recompute the disputed step and judge the accusation; pure but for the model.

    Raises InvalidEvidence when the evidence is not signed by its accuser (nobody to charge
    for it) and SpanError when ``span`` is not the evidence's model or does not hold its
    blocks (load the right one). Otherwise returns a verdict: not guilty, with the reason,
    when a receipt signature, chain link, input hash or token count does not hold or the
    recomputed output is within ``AUDIT_TOLERANCE`` of the commitment; guilty when the
    distance exceeds it (or the node signed no valid commitment for its output).

    Cost: one forward of the span over all ``k + 1`` steps' tokens, on this thread.
    """
    from layerchain.market.commitment import AUDIT_TOLERANCE, commitment_distance

    if not evidence.signed_by_accuser():
        raise InvalidEvidence(
            f"evidence is not signed by its accuser {evidence.accuser} (altered or forged)"
        )
    if span.spec.model_id != evidence.model_id:
        raise SpanError(
            f"evidence is for model {evidence.model_id[:12]}, the span loaded is "
            f"{span.spec.model_id[:12]} ({span.spec.name})",
            hint="load the model the evidence names",
        )
    if not span.start <= evidence.start < evidence.end <= span.end:
        raise SpanError(f"evidence is for blocks {evidence.start}:{evidence.end}, the span holds {span.span}")

    accused, problem = _chain_problem(evidence)
    disputed = evidence.receipts[-1] if _signed_by(evidence.receipts[-1], accused) else b""

    def verdict(guilty: bool, distance: float, reason: str) -> EvidenceVerdict:
        return EvidenceVerdict(
            evidence.evidence_hash, evidence.accuser, accused, evidence.step, guilty,
            distance, AUDIT_TOLERANCE, reason, disputed,
        )

    if problem:
        return verdict(False, 0.0, f"the accused receipts do not hold together: {problem}")
    commitment = SignedReceipt.from_bytes(disputed).receipt.fingerprint
    if not commitment:
        return verdict(False, 0.0, f"the receipt of step {evidence.step} carries no commitment")
    out = _recompute(evidence, span)
    try:
        distance = commitment_distance(commitment, out)
    except InvalidOutput as error:  # a commitment no honest node signs for this output
        return verdict(True, math.inf, f"the node signed a malformed commitment ({error})")
    if distance > AUDIT_TOLERANCE:
        return verdict(
            True, distance,
            f"step {evidence.step}'s commitment is {distance:.4g} from the recomputed output "
            f"(tolerance {AUDIT_TOLERANCE:.4g})",
        )
    return verdict(
        False, distance,
        f"step {evidence.step}'s commitment matches the recomputed output ({distance:.4g} <= "
        f"{AUDIT_TOLERANCE:.4g}): the accused computed honestly",
    )


def _recompute(evidence: Evidence, span: SpanModel) -> torch.Tensor:
    """The hop's output of step k, computed as a node computes it: the same blocks, a fresh
    cache, steps 0..k in order in float32, the output cast back to each input's dtype."""
    cache = span.new_cache(evidence.start, evidence.end)
    out = evidence.inputs[0]
    for x in evidence.inputs:
        out = span.forward(x if x.dtype == torch.float32 else x.float(), cache)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
    return out


def submit_evidence(
    ledger: Ledger, evidence: Evidence, accuser_signer: Signer, span: SpanModel
) -> SlashResult:
    """Check ``evidence`` with ``span`` and record the verdict on ``ledger``, signed by the
    accuser: what a client holding a ledger calls after a referee confirms a cheat.

    Returns the conviction's SlashResult. Raises FalseAccusation (after the ledger took the
    bond) when the evidence does not prove cheating; InvalidEvidence when it is not signed
    by ``accuser_signer``; InsufficientFunds before any recomputation when the accuser holds
    less than the ledger's bond; LedgerError when the receipt already convicted or the
    accused has no stake.
    """
    if address_bytes(accuser_signer.address) != address_bytes(evidence.accuser):
        raise InvalidEvidence(
            f"evidence names accuser {evidence.accuser}, not {accuser_signer.address}"
        )
    bond = ledger.config.accuser_bond
    have = ledger.balance(evidence.accuser)
    if have < bond:
        raise InsufficientFunds(
            f"{evidence.accuser} has {have} credits; an accusation needs a bond of {bond}",
            hint="deposit credits before accusing",
        )
    verdict = check_evidence(evidence, span)
    result = ledger.slash(accuser_signer, verdict)
    if not result.guilty:
        raise FalseAccusation(
            f"accusation refused: {verdict.reason}; the bond of {result.bond} credits went "
            "to the accused"
        )
    return result
