"""The market: wallets, receipts (proof of contribution) and payment channels.

Integration API (node side / client side)::

    wallet = Wallet.load_or_create(data_dir)
    # node, per session on a hop
    signer = ReceiptSigner(wallet, session_id, model_id, span, price_per_block)
    receipt_bytes = signer.sign_step(step, tokens, input_tensor, output_tensor)
    book = VoucherBook(wallet.address, ledger.channel, domain=ledger.domain_separator,
                       store=VoucherStore.for_data_dir(d))
    book.accept(voucher_bytes, owed_total)           # raises InsufficientFunds when behind
    fee = reservation_amount(max_length, blocks, price)  # paid by the OpenSession voucher
    redeem_stored(ledger, book.latest())             # session end / periodically
    # client, per hop
    verifier = ReceiptVerifier(node_address, session_id, model_id, span, price_per_block)
    verifier.check(receipt_bytes, input_tensor, output_tensor)   # raises InvalidReceipt
    payer = ChannelPayer(wallet, ledger, deposit=...)  # vouchers under ledger.domain_separator
    voucher_bytes = payer.voucher_for(node_address, amount_delta)
    payer.close(channel_id)                          # signed by the payer's wallet
"""

from layerchain.market.receipts import (
    Receipt,
    ReceiptSigner,
    ReceiptVerifier,
    SignedReceipt,
    receipt_hash,
    reservation_amount,
    sign_receipt,
    step_amount,
    tensor_sha256,
    tokens_of,
    verify_receipt,
)
from layerchain.market.vouchers import (
    ChannelPayer,
    Redemption,
    Voucher,
    VoucherBook,
    VoucherStore,
    redeem_stored,
    sign_voucher,
    verify_voucher,
)
from layerchain.market.wallet import Wallet

__all__ = [
    "ChannelPayer",
    "Receipt",
    "ReceiptSigner",
    "ReceiptVerifier",
    "Redemption",
    "SignedReceipt",
    "Voucher",
    "VoucherBook",
    "VoucherStore",
    "Wallet",
    "receipt_hash",
    "redeem_stored",
    "reservation_amount",
    "sign_receipt",
    "sign_voucher",
    "step_amount",
    "tensor_sha256",
    "tokens_of",
    "verify_receipt",
    "verify_voucher",
]
