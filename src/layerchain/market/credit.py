"""Credit: how far a channel's vouchers may lag the work a priced node served on it.

Seed 002 asks for "payment held in escrow until the computation is completed and
verified". A client that audits (``ClientConfig.audit_rate``) pays a hop for a step only
once an audit verified it, so a node that cheats is never paid for the steps it lied on.
For that a node serves on credit: at most ``CREDIT_TOKENS`` tokens of its work unpaid per
channel (``credit_amount(blocks, price)`` credits); a step that would leave more unpaid is
refused (``InsufficientFunds``) and the session is not served further. Pure rules, shared
by the node (``node/payments.py``) and the client (``client/funding.py``).

What a node risks: one credit window per channel of a client that stops paying. Opening a
channel costs that client a ledger operation, the reservation fee (paid in advance) and a
deposit locked until the ledger's dispute window has passed, so buying free work channel
after channel is slow and bounded. (Bounding the credit by what the channel paid so far
would close even that, but then a client pays half of every window before it is
verified: a cheater would be paid half of what it lied on.)

The client pays the least its node accepts (``least_payment``): everything audits have
cleared, and what lies beyond the credit. A step that would pass it waits for the audit
it needs (``layerchain.client.audit``), so an honest client's vouchers cover exactly the
verified work, and the unverified tail is at most ``CREDIT_TOKENS`` tokens.
"""

from __future__ import annotations

CREDIT_TOKENS = 128  # tokens of a node's work (x its blocks x its price) a channel may owe


def credit_amount(blocks: int, price_per_block: int) -> int:
    """Credits a node serving ``blocks`` blocks at ``price_per_block`` lends a channel at most."""
    return CREDIT_TOKENS * blocks * price_per_block


def least_payment(owed: int, cleared: int, credit: int) -> int:
    """The smallest cumulative amount a channel may pay when ``owed`` credits were served on
    it, ``cleared`` of them verified: at least ``cleared``, and no more than ``credit``
    short of ``owed`` (what the node accepts)."""
    return max(cleared, owed - credit, 0)
