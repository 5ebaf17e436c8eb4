"""The public API, pinned: what each package exports in ``__all__``.

A failure here means a name users import appeared, vanished or moved. If that is on
purpose, update ``PUBLIC_API`` in the same change (and say so in its message); if not, the
change broke someone's import.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC_API: dict[str, list[str]] = {
    "layerchain.client": [
        "AsyncSwarm", "ClientConfig", "Dispute", "Generation", "GenerationResult", "HopPayment",
        "InferenceSession", "NodeProbe", "Recovery", "RouteLimits", "Swarm",
        "SyncGeneration", "TokenEvent", "live_snapshot", "probe_nodes",
    ],
    "layerchain.node": [
        "Node", "NodeConfig", "SessionTable",
    ],
    "layerchain.model": [
        "DEFAULT_MODEL", "DecodeResult", "Decoder", "Head", "KVCache", "LocalModel",
        "ModelSpec", "Sampler", "SamplingParams", "SpanModel", "StopChecker",
        "causal_mask", "convert_to_shards", "encode_prompt", "generate_local",
        "load_head", "load_span", "load_tokenizer", "read_manifest", "resolve_model",
        "verify_file",
    ],
    "layerchain.wire": [
        "CloseSession", "Connection", "DEFAULT_LIMITS", "Dialer", "ERROR_CODES", "ErrorReply",
        "Info", "InfoReply", "Limits", "Listener", "MAX_STEP_TOKENS", "MemoryNetwork",
        "MemoryTransport", "Message", "OpenSession", "PROTOCOL_VERSION", "Ping", "Pong",
        "RpcClient", "ServeStats", "SessionClosed", "SessionOpened", "Step",
        "StepResult", "TcpTransport", "TlsTransport", "Transport", "decode", "encode",
        "encode_bytes",
        "peer_error", "serve_connection", "transport_for",
    ],
    "layerchain.discovery": [
        "AnnounceConfig", "Announcer", "DHTConfig", "Discovery", "DiscoveryStats",
        "HivemindDiscovery", "Identity", "MemoryDHT", "MemoryDiscovery", "PeerRecord",
        "block_key", "check_fresh", "open_record", "peer_id_from_public_key",
        "run_bootstrap", "select_records", "sign_record", "start_bootstrap", "verify",
        "verify_record",
    ],
    "layerchain.routing": [
        "MODES", "RouteLimits", "RoutePeer", "RoutePeers", "RoutePlan", "Snapshot", "check_route",
        "default_max_price", "median_block_prices", "pareto_front", "parse_snapshot",
        "plan_route", "plan_span", "route_terms",
    ],
    "layerchain.market": [
        "ChannelPayer", "Receipt", "ReceiptSigner", "ReceiptVerifier", "Redemption",
        "SignedReceipt", "Voucher", "VoucherBook", "VoucherStore", "Wallet",
        "receipt_hash", "redeem_stored", "reservation_amount", "sign_receipt",
        "sign_voucher", "step_amount", "tensor_sha256", "tokens_of", "verify_receipt",
        "verify_voucher",
    ],
    "layerchain.ledger": [
        "AccountInfo", "Channel", "Checkpoint", "CheckpointStore", "EvmLedger",
        "JournalEntry", "Ledger", "LedgerConfig", "MAX_AMOUNT", "NodeInfo", "Operation", "SqliteLedger",
        "VerifyReport", "Voucher", "new_operation", "open_ledger", "sign_checkpoint",
        "sign_operation", "sign_voucher", "verify_checkpoint", "verify_operation",
    ],
    "layerchain.gateway": [
        "ApiKey", "GatewayConfig", "KeyStore", "create_app", "serve",
    ],
}


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_exports_are_pinned(package):
    exported = list(importlib.import_module(package).__all__)
    assert len(exported) == len(set(exported)), f"{package} exports a name twice"
    assert sorted(exported) == PUBLIC_API[package]


@pytest.mark.parametrize("package", sorted(PUBLIC_API))
def test_every_export_is_layerchain_code(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        obj = getattr(module, name)  # lazy exports resolve too
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("layerchain."), f"{package}.{name} is {obj.__module__}'s"


def test_one_name_one_meaning():
    """A name exported by two packages is the same object in both (one vocabulary)."""
    first: dict[str, tuple[str, object]] = {}
    for package in sorted(PUBLIC_API):
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            where, seen = first.setdefault(name, (package, obj))
            assert seen is obj, f"{name} means different things in {where} and {package}"
