"""Credit: how far a channel's vouchers may lag the work a priced node served on it.

Seed 002 asks for "payment held in escrow until the computation is completed and
verified". A client that audits (``ClientConfig.audit_rate``) pays a hop for a step only
once an audit verified it, so a node that cheats is never paid for the steps it lied on.
For that a node serves on credit, bounded two ways (pure rules, shared by node and client):

* at most ``CREDIT_TOKENS`` tokens of its work unpaid per channel
  (``credit_amount(blocks, price)`` credits);
* never more unpaid than the channel has already paid (``credit_allowance``): a node
  risks at most what that payer has given it, so a fresh channel (a client that never
  paid) gets no credit and opening channel after channel buys no free work.

The client pays the least its node accepts (``least_payment``): everything audits have
cleared, and enough of the rest to stay within the credit. A step that would pass it
waits for the audit it needs (``layerchain.client.audit``), so an honest client's vouchers
cover exactly the verified work, and the unverified tail is at most ``CREDIT_TOKENS``.
"""

from __future__ import annotations

CREDIT_TOKENS = 128  # tokens of a node's work (x its blocks x its price) a channel may owe


def credit_amount(blocks: int, price_per_block: int) -> int:
    """Credits a node serving ``blocks`` blocks at ``price_per_block`` lends a channel at most."""
    return CREDIT_TOKENS * blocks * price_per_block


def credit_allowance(credit: int, paid: int) -> int:
    """Credits a channel that has paid ``paid`` in all (its voucher's cumulative amount) may
    owe on top: ``credit``, but never more than it paid."""
    return max(0, min(credit, paid))


def least_payment(owed: int, cleared: int, credit: int) -> int:
    """The smallest cumulative amount a channel may pay when ``owed`` credits were served on
    it, ``cleared`` of them verified: at least ``cleared``, and ``X`` with
    ``X + credit_allowance(credit, X) >= owed``."""
    half = -(-owed // 2)  # X = X's own allowance: owed / 2 rounded up
    need = half if half <= credit else owed - credit
    return max(cleared, need, 0)
