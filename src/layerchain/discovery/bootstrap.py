"""A bootstrap DHT node: a swarm entry point that announces nothing (``layerchain swarm up``).

Run it as a process::

    python -m layerchain.discovery.bootstrap --host 127.0.0.1 --port 0 \\
        --print-addresses-to FILE

It prints its multiaddrs (one per line) to stdout, writes them atomically to FILE (so a
parent can poll for the file), and serves until SIGTERM or SIGINT, then shuts its DHT
(and p2pd) down and exits 0. Exit status 1 with one line on stderr if it cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from layerchain.discovery.dht import DHTConfig, HivemindDiscovery
from layerchain.errors import LayerchainError


async def start_bootstrap(
    host: str = "127.0.0.1",
    port: int = 0,
    initial_peers: Sequence[str] = (),
    config: DHTConfig = DHTConfig(),
) -> HivemindDiscovery:
    """A DHT node that only routes: a new swarm, or a second entry point into ``initial_peers``."""
    return await HivemindDiscovery.create(
        initial_peers=initial_peers,
        host=host,
        port=port,
        new_swarm=not initial_peers,
        config=config,
    )


def write_addresses(path: str | os.PathLike[str], addresses: Sequence[str]) -> None:
    """Write one address per line; the file appears complete or not at all."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{a}\n" for a in addresses))
    os.replace(tmp, target)


async def serve_bootstrap(
    host: str = "127.0.0.1",
    port: int = 0,
    initial_peers: Sequence[str] = (),
    addresses_file: str | None = None,
    stop: asyncio.Event | None = None,
) -> list[str]:
    """Serve a bootstrap node until ``stop`` is set (or SIGTERM/SIGINT); return its addresses."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    node = await start_bootstrap(host, port, initial_peers)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        addresses = list(node.visible_addresses)
        print("\n".join(addresses), flush=True)
        if addresses_file:
            write_addresses(addresses_file, addresses)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await node.close()
    return addresses


def run_bootstrap(
    host: str = "127.0.0.1",
    port: int = 0,
    initial_peers: Sequence[str] = (),
    addresses_file: str | None = None,
) -> list[str]:
    """Blocking ``serve_bootstrap``: serves until SIGTERM/SIGINT, returns the addresses served."""
    return asyncio.run(serve_bootstrap(host, port, initial_peers, addresses_file))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m layerchain.discovery.bootstrap", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--initial-peers", nargs="*", default=[], help="join an existing swarm")
    parser.add_argument("--print-addresses-to", metavar="FILE", help="also write addresses here")
    args = parser.parse_args(argv)
    try:
        run_bootstrap(args.host, args.port, args.initial_peers, args.print_addresses_to)
    except LayerchainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
