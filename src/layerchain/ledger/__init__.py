"""Ledgers: where credits live. ``open_ledger(path)`` gives the embedded SQLite ledger.

See ``base.py`` for the seam and its invariants, ``journal.py`` for the rules,
``records.py`` for the signed vouchers and liveness records it settles.
"""

from layerchain.ledger.base import (
    MAX_AMOUNT,
    AccountInfo,
    Channel,
    JournalEntry,
    Ledger,
    LedgerConfig,
    NodeInfo,
    VerifyReport,
)
from layerchain.ledger.records import LivenessRecord, Voucher, sign_liveness, sign_voucher
from layerchain.ledger.sqlite import SqliteLedger, open_ledger

__all__ = [
    "MAX_AMOUNT",
    "AccountInfo",
    "Channel",
    "JournalEntry",
    "Ledger",
    "LedgerConfig",
    "LivenessRecord",
    "NodeInfo",
    "SqliteLedger",
    "VerifyReport",
    "Voucher",
    "open_ledger",
    "sign_liveness",
    "sign_voucher",
]
