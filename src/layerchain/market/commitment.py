"""Commitments: a few bytes per token that pin down the hidden states a hop returned.

A node puts ``commit(out)`` of the tensor it returns in its receipt's ``fingerprint`` (a
signed field), so the receipt says *what* it computed, not only that it computed. Two uses:

* every step, the client checks ``check_commitment(fingerprint, out)``: the signed
  commitment is exactly that of the tensor received (a node cannot sign one output and
  return another); pure and cheap (one top-k per token);
* an audit recomputes the hop on another peer (or a referee, or a third party holding the
  evidence) and asks ``commitment_agrees(fingerprint, recomputed)``: honest recomputations
  differ only by float rounding (thread counts, prefill vs decode, chunking, fp16 on the
  wire), which stays far below ``AUDIT_TOLERANCE``; a node that adds noise, skips blocks,
  replays old outputs or runs other weights lands far above it.

After TOPLOC (Ong et al., 2025, "TOPLOC: A Locality Sensitive Hashing Scheme for Trustless
Verifiable Inference"): the top-k magnitudes of the hidden states and their positions are
stable under honest rounding and move under any change of model, input or precision.

Layout, per token ``t`` of ``hidden [1, T, H]`` (``COMMITMENT_BYTES_PER_TOKEN`` = 16 bytes)::

    uint16 index[K]    little-endian, the K positions of largest |value|, largest first
                       (ties: the lower index first), K = TOP_K = 4; so H <= 65536
    float16 value[K]   little-endian, the signed value at each position, rounded to fp16

A commitment is ``T`` such records back to back. The order within a token and the tie rule
make ``commit`` a pure function of the tensor's values: any two machines agree bit for bit.

``commitment_distance`` per token is the larger of

* the value error: ``max_j |v_j - r[i_j]| / max(|v_j|, |r[i_j]|)``, the relative gap at
  the committed positions between the committed values and the recomputed ones ``r``;
* the rank error: ``max(0, m - min_j |r[i_j]|) / m``, with ``m`` the largest ``|r|`` at a
  position not committed: how much larger than the committed positions some other one is
  in the recomputation (0 when the committed positions are still its top-K; near-ties
  swapped by rounding cost ~0);

both in [0, 2]; the distance of a commitment is the max over its tokens. It knows nothing
of networks, receipts or who computed what.
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from layerchain.errors import InvalidOutput

TOP_K = 4  # positions committed per token
COMMITMENT_BYTES_PER_TOKEN = 4 * TOP_K  # uint16 index + float16 value per position
MAX_HIDDEN_SIZE = 2**16  # indices are uint16
_FP16_MAX = 65504.0  # committed values are clamped to float16's finite range
_TINY = 1e-30  # denominators: two zero values are equal, not 0/0

# Largest commitment_distance an honest recomputation may show. Measured (tests/test_commitment
# .py; SmolLM2-135M in 3 hops, 1 vs 2 threads, decode vs a replay in one prefill or 3-token
# chunks, prompts in 5- or 512-token Steps): fp32 on the wire <= 4.6e-4 (the fp16 rounding of
# the committed values, at most 2^-11 = 4.9e-4); bf16 on the wire 0 when the auditor casts
# to bf16 as the node did, else <= 4.0e-3 (one bf16 ulp: at most 2^-7 = 7.8e-3). 0.02 is 2.5x
# the bf16 bound and 40x fp32's; every cheating mode of node.misbehave sits above it on
# (nearly) every step: nearest steps 0.028 (a 4-bit re-quantised model), 0.07 (noise of
# the token's RMS), 0.12 (stale), 0.27 (every other block skipped), 1.0 (zeros). Below it:
# noise under ~0.1x RMS, weights x (1 + 1e-3 noise), an 8-bit re-quantisation.
AUDIT_TOLERANCE = 0.02

_RECORD = np.dtype([("index", "<u2", (TOP_K,)), ("value", "<f2", (TOP_K,))])
assert _RECORD.itemsize == COMMITMENT_BYTES_PER_TOKEN
# one token's record (struct's "e" rounds a float to float16 as numpy's cast does: to
# nearest, ties to even; tests/test_commitment.py checks it over every float16 midpoint)
_TOKEN = struct.Struct(f"<{TOP_K}H{TOP_K}e")


def _rows(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` [1, T, H] (any float dtype, any device) as float32 [T, H] on the CPU."""
    if hidden.dim() != 3 or hidden.shape[0] != 1:
        raise InvalidOutput(f"a commitment covers hidden states [1, T, H], got {list(hidden.shape)}")
    if not 1 <= hidden.shape[2] <= MAX_HIDDEN_SIZE:
        raise InvalidOutput(f"hidden size {hidden.shape[2]} is outside 1..{MAX_HIDDEN_SIZE}")
    return hidden.detach()[0].to(device="cpu", dtype=torch.float32)


def _top_positions(rows: torch.Tensor) -> torch.Tensor:
    """int64 [T, K]: per row the K positions of largest |value|, largest first, ties by
    lower index (a deterministic order: ``topk`` alone leaves ties to the platform).
    Few torch ops when nothing ties: this runs on every step, on both sides."""
    magnitude = rows.abs()
    k = min(TOP_K + 1, rows.shape[1])
    values, positions = torch.topk(magnitude, k, dim=1, sorted=True)
    ties = (values[:, 1:] == values[:, :-1]) | values[:, 1:].isnan()  # [T, k - 1]
    if bool(ties.any()):  # rare (a zero tensor, saturated values): a stable sort decides
        tied = ties.any(dim=1)
        stable = torch.sort(magnitude[tied], dim=1, descending=True, stable=True).indices
        positions = positions.clone()
        positions[tied] = stable[:, :k]
    top = positions[:, :TOP_K]
    if top.shape[1] < TOP_K:  # H < K: repeat the last position (its value repeats too)
        top = torch.cat([top, top[:, -1:].expand(-1, TOP_K - top.shape[1])], dim=1)
    return top


def _commit_token(hidden: torch.Tensor) -> bytes | None:
    """``commit`` of one token [1, 1, H] (a decode step, on both sides of every hop) in a
    handful of numpy calls instead of a dozen torch ops (18 against 74 us); None when it
    cannot decide alone (the top values tie or are NaN, H <= TOP_K): ``commit``'s general
    path does. Same bytes: the K largest |value| of the K + 1 that ``argpartition`` finds,
    strictly decreasing (no tie), are the top-K in any order rule."""
    row = hidden.detach()
    if row.dtype is not torch.float32 or row.device.type != "cpu":
        row = row.to(device="cpu", dtype=torch.float32)
    values = row.reshape(-1).numpy()
    size = values.shape[0]
    if not TOP_K < size <= MAX_HIDDEN_SIZE:
        return None
    magnitude = np.abs(values)
    found = np.argpartition(magnitude, size - TOP_K - 1)[size - TOP_K - 1 :].tolist()
    ranked = sorted(zip(magnitude.take(found).tolist(), found), key=lambda p: (-p[0], p[1]))
    for (larger, _), (smaller, _) in zip(ranked, ranked[1:]):
        if not larger > smaller:  # a tie, or NaN
            return None
    positions = [p for _, p in ranked[:TOP_K]]
    committed = [min(max(v, -_FP16_MAX), _FP16_MAX) for v in values.take(positions).tolist()]
    return _TOKEN.pack(*positions, *committed)


def commit(hidden: torch.Tensor) -> bytes:
    """The commitment of ``hidden`` [1, T, H]: ``T * COMMITMENT_BYTES_PER_TOKEN`` bytes.

    Deterministic: equal values give equal bytes, whatever the tensor's dtype, layout or
    device and the thread count. Raises InvalidOutput for a tensor that is not [1, T, H] with H <= 65536."""
    if hidden.dim() == 3 and hidden.shape[0] == 1 and hidden.shape[1] == 1:
        token = _commit_token(hidden)
        if token is not None:
            return token
    rows = _rows(hidden)
    positions = _top_positions(rows)
    values = rows.gather(1, positions).clamp_(-_FP16_MAX, _FP16_MAX)
    record = np.empty(rows.shape[0], dtype=_RECORD)
    record["index"] = positions.numpy()  # int64 -> <u2: positions < H <= 65536
    record["value"] = values.numpy()  # float32 -> <f2, rounded to nearest
    return record.tobytes()


def decode(commitment: bytes, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions int64 [T, K], values float32 [T, K]) of a commitment of ``tokens`` tokens;
    InvalidOutput if its length is not ``tokens * COMMITMENT_BYTES_PER_TOKEN``."""
    if len(commitment) != tokens * COMMITMENT_BYTES_PER_TOKEN:
        raise InvalidOutput(
            f"a commitment of {tokens} tokens is {tokens * COMMITMENT_BYTES_PER_TOKEN} bytes, "
            f"got {len(commitment)}"
        )
    record = np.frombuffer(commitment, dtype=_RECORD)
    positions = torch.from_numpy(record["index"].astype(np.int64))
    values = torch.from_numpy(record["value"].astype(np.float32))
    return positions, values


def check_commitment(commitment: bytes, hidden: torch.Tensor) -> None:
    """InvalidOutput unless ``commitment`` is exactly ``commit(hidden)``: the node signed a
    commitment of another tensor than the one it returned. Every step; cheap."""
    if commitment != commit(hidden):
        raise InvalidOutput(
            f"the receipt's commitment ({len(commitment)} bytes) is not that of the "
            f"{list(hidden.shape)} hidden states returned: the node signed another output"
        )


def token_distances(commitment: bytes, reference: torch.Tensor) -> torch.Tensor:
    """float32 [T]: per token, how far the committed output is from ``reference`` [1, T, H]
    (a recomputation of the same step); see the module docstring. InvalidOutput if the
    commitment does not fit the reference's shape."""
    rows = _rows(reference)
    positions, values = decode(commitment, rows.shape[0])
    if rows.shape[0] and int(positions.max()) >= rows.shape[1]:
        raise InvalidOutput(
            f"the commitment names position {int(positions.max())} of a {rows.shape[1]}-wide "
            "hidden state"
        )
    recomputed = torch.gather(rows, 1, positions)  # [T, K]
    scale = torch.maximum(values.abs(), recomputed.abs()).clamp_min(_TINY)
    value_error = ((values - recomputed).abs() / scale).amax(dim=1)
    others = rows.abs().scatter(1, positions, 0.0).amax(dim=1)  # [T]: largest not committed
    rank_error = (others - recomputed.abs().amin(dim=1)).clamp_min(0) / others.clamp_min(_TINY)
    distance = torch.maximum(value_error, rank_error)
    return torch.nan_to_num(distance, nan=2.0)  # NaN anywhere: as far as it gets


def commitment_distance(commitment: bytes, reference: torch.Tensor) -> float:
    """How far the committed output is from ``reference`` [1, T, H]: the max over tokens of
    ``token_distances`` (0.0 for T = 0). Honest recomputations stay below
    ``AUDIT_TOLERANCE``."""
    distances = token_distances(commitment, reference)
    return float(distances.max()) if distances.numel() else 0.0


def commitment_agrees(commitment: bytes, reference: torch.Tensor) -> bool:
    """Whether ``reference`` (a recomputation) is within ``AUDIT_TOLERANCE`` of the
    committed output: False means one of the two computations is wrong."""
    return commitment_distance(commitment, reference) <= AUDIT_TOLERANCE
