"""Ledgers: where credits live. ``open_ledger(spec)`` opens the one a ``--ledger`` spec names:
a file is the embedded SQLite ledger, ``evm+http://HOST:PORT`` the contract on a chain
(``open.py``, ``EvmLedger``: imported when first asked for, so that importing this package
does not load the EVM side).

See ``base.py`` for the seam and its invariants, ``journal.py`` for the rules,
``operations.py`` for the signed operations that change accounts, ``records.py`` for the
vouchers it settles and ``checkpoints.py`` for the signed heads that anchor its journal.
"""

from typing import Any

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
from layerchain.ledger.checkpoints import Checkpoint, CheckpointStore, sign_checkpoint, verify_checkpoint
from layerchain.ledger.operations import Operation, new_operation, sign_operation, verify_operation
from layerchain.ledger.records import Voucher, sign_voucher
from layerchain.ledger.open import open_ledger
from layerchain.ledger.sqlite import SqliteLedger

__all__ = [
    "MAX_AMOUNT",
    "AccountInfo",
    "Channel",
    "Checkpoint",
    "CheckpointStore",
    "EvmLedger",
    "JournalEntry",
    "Ledger",
    "LedgerConfig",
    "NodeInfo",
    "Operation",
    "SqliteLedger",
    "VerifyReport",
    "Voucher",
    "new_operation",
    "open_ledger",
    "sign_checkpoint",
    "sign_operation",
    "sign_voucher",
    "verify_checkpoint",
    "verify_operation",
]


def __getattr__(name: str) -> Any:  # the EVM ledger: only when it is asked for
    if name == "EvmLedger":
        from layerchain.ledger.evm import EvmLedger

        return EvmLedger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
