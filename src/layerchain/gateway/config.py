"""Configuration of a gateway: one frozen record; `layerchain api serve`'s flags come from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from layerchain.model.spec import DEFAULT_MODEL
from layerchain.routing import RouteLimits

DEFAULT_DATA_DIR = Path("~/.layerchain")  # the gateway's keys file lives here by default
KEYS_FILE = "gateway-keys.sqlite"  # name of the API-key store inside the data dir


@dataclass(frozen=True)
class GatewayConfig:
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs of the swarm
    model: str = DEFAULT_MODEL  # model reference the swarm serves (see model.spec)
    host: str = "127.0.0.1"  # address uvicorn listens on
    port: int = 8000  # TCP port uvicorn listens on; 0 picks a free one
    data_dir: Path = DEFAULT_DATA_DIR  # holds the keys file (and the wallet, when paying)
    keys_path: Path | None = None  # API-key store; None = data_dir / KEYS_FILE. A store named
    # here must exist and be readable (else the gateway does not start): keys fail closed
    require_keys: bool = False  # demand a key even while the key store is empty
    allowed_hosts: tuple[str, ...] = ()  # DNS names the gateway answers under, besides IP
    # literals and localhost (DNS-rebinding guard); "*" = any (behind a proxy that checks)
    allowed_origins: tuple[str, ...] = ()  # web origins (scheme://host[:port]) whose pages may
    # call the API from a browser, besides the gateway's own dashboard
    max_body_bytes: int = 1 << 20  # a request body larger than this gets 413, bytes
    ledger: str | Path | None = None  # ledger spec (a file or evm+http://HOST:PORT,
    # layerchain.ledger.open) to pay priced peers on; None = do not pay
    deposit: int | None = None  # credits locked per payment channel; None = client default
    limits: RouteLimits = RouteLimits()  # default routing limits (alpha 0 fastest .. 1
    # cheapest, max_price credits per token, max_latency_ms per token); a request's own
    # alpha, max_price, max_latency_ms replace them field by field
    default_max_tokens: int = 256  # tokens generated when a request gives no max_tokens
    max_tokens_limit: int = 4096  # a request asking for more tokens gets 400
    recent_requests: int = 50  # requests the dashboard shows (kept in memory only)
    client_options: dict = field(default_factory=dict)  # more ClientConfig fields, by name

    @property
    def keys_file(self) -> Path:
        return Path(self.keys_path or Path(self.data_dir) / KEYS_FILE).expanduser()
