"""Encrypted, authenticated links: endpoints ``tls://HOST:PORT``, TLS 1.3 over TCP.

A node proves its layerchain peer id with the Ed25519 key that already signs its records
(``discovery.Identity``): at start it puts the key in a self-signed X.509 certificate, made
in memory, and serves TLS 1.3 with it. No certificate authority is involved: the client
knows the peer id it wants from the peer's signed record, and after the handshake it takes
the certificate's public key, derives the peer id from it (``peer_id_from_public_key``) and
refuses the connection (``PeerAuthFailed``) unless it is the expected one. TLS 1.3's
CertificateVerify, which OpenSSL checks whatever the verify mode, proves that the other end
holds the private key of that certificate, so a man in the middle can neither show its own
key (wrong id) nor replay the node's certificate (no key to sign the handshake with). A
pure byte relay in between sees only ciphertext, and works.

The framed protocol is ``wire.tcp``'s: a ``TcpConnection`` runs as the application protocol
of asyncio's TLS transport, with every limit and slowloris defence. A listener upgrades
each connection after accepting it, so a socket still in its handshake counts against
``max_connections`` (and is evicted first), and a handshake not done within
``Limits.read_timeout_s`` is dropped. Clients stay anonymous (no client certificate):
the accepting side's ``remote_peer_id`` is None, and a client is known by what it signs.

``tls_client_over`` / ``tls_server_over`` run the same over a socket that is already
connected (the relay, ``relay://``).

What this module does not know: records, routing, relays. It knows sockets and keys.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from layerchain.discovery.identity import Identity, peer_id_from_public_key
from layerchain.errors import ConfigError, PeerAuthFailed, PeerUnreachable
from layerchain.wire.codec import DEFAULT_LIMITS, Limits
from layerchain.wire.tcp import (
    TcpConnection,
    TcpListener,
    parse_tcp_endpoint,
    start_listener,
)

SCHEME = "tls"
_CERT_DAYS = 3650  # validity of the self-signed certificate; nobody checks dates (no CA)


# ------------------------------------------------------------------ certificates and contexts


def self_signed_certificate(key: Ed25519PrivateKey) -> bytes:
    """A DER X.509 certificate of ``key``'s public key, signed by ``key`` itself; its subject
    names the peer id. Only the public key in it matters to a layerchain client."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id_from_public_key(raw))])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate skewed clocks
        .not_valid_after(now + datetime.timedelta(days=_CERT_DAYS))
        .sign(key, algorithm=None)  # Ed25519 hashes internally
    )
    return cert.public_bytes(serialization.Encoding.DER)


def peer_id_of_certificate(der: bytes) -> str:
    """The layerchain peer id of the Ed25519 key in a DER certificate. ValueError for a
    certificate that cannot be parsed or holds another kind of key (the caller refuses)."""
    public_key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError(f"certificate key is {type(public_key).__name__}, not Ed25519")
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return peer_id_from_public_key(raw)


def server_context(identity: Identity) -> ssl.SSLContext:
    """A TLS 1.3-only server context presenting ``identity``'s key in a fresh certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    cert_pem = ssl.DER_cert_to_PEM_cert(self_signed_certificate(identity.private_key)).encode()
    key_pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _load_chain(ctx, cert_pem + key_pem)
    return ctx


@functools.lru_cache(maxsize=4)
def _cached_server_context(identity: Identity) -> ssl.SSLContext:
    return server_context(identity)


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``ctx.load_cert_chain`` from bytes. The ssl module reads only files: an anonymous
    in-memory file where the OS has one (Linux memfd), else a private temporary file that
    is deleted at once. The key never reaches a named file on Linux."""
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("layerchain-tls", os.MFD_CLOEXEC)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="layerchain-tls-") as directory:  # mode 0700
        path = Path(directory) / "chain.pem"
        path.write_bytes(pem)
        ctx.load_cert_chain(path)


def client_context() -> ssl.SSLContext:
    """A TLS 1.3-only client context that accepts any certificate chain: trust comes from
    the peer id check after the handshake (``_authenticate``), not from a CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_client_context = functools.lru_cache(maxsize=1)(client_context)  # shared: holds no secret


async def _authenticate(conn: TcpConnection, endpoint: str, peer_id: str | None) -> TcpConnection:
    """Set ``conn.remote_peer_id`` from the peer's certificate; close the connection and
    raise PeerAuthFailed if ``peer_id`` is given and the certificate proves another."""
    ssl_object = conn.extra("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
    try:
        proved = peer_id_of_certificate(der) if der else None
    except ValueError as error:
        proved, why = None, str(error)
    else:
        why = "no certificate" if proved is None else f"it proves peer {proved}"
    if peer_id is not None and proved != peer_id:
        await conn.close()
        raise PeerAuthFailed(
            f"{endpoint} is not peer {peer_id}: {why}",
            peer_id=peer_id,
            hint="another node answers there, or someone is in the middle",
        )
    conn.remote_peer_id = proved
    return conn


# ------------------------------------------------------------------ transport


class TlsTransport:
    """``Transport`` over TLS 1.3: ``tls://HOST:PORT``. Listening needs an ``identity``."""

    def __init__(
        self,
        identity: Identity | None = None,
        limits: Limits = DEFAULT_LIMITS,
        *,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.identity = identity  # the key listeners prove; None: this side only dials
        self.limits = limits
        self.connect_timeout_s = connect_timeout_s  # seconds for TCP connect + TLS handshake
        self._server_context: ssl.SSLContext | None = None

    async def connect(self, endpoint: str, *, peer_id: str | None = None) -> TcpConnection:
        """Dial ``endpoint`` and check it proves ``peer_id`` (``PeerAuthFailed`` if not;
        ``None`` accepts any key, and ``remote_peer_id`` says which it was)."""
        host, port = parse_tcp_endpoint(endpoint, SCHEME)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: TcpConnection(self.limits, endpoint, scheme=SCHEME),
                    host,
                    port,
                    ssl=_client_context(),
                    server_hostname="",  # no SNI: the peer id, not a name, is checked
                    ssl_handshake_timeout=self.connect_timeout_s,
                ),
                self.connect_timeout_s,
            )
        except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
            raise PeerUnreachable(f"cannot connect to {endpoint}: {error or 'timeout'}") from error
        return await _authenticate(conn, endpoint, peer_id)

    async def listen(
        self, endpoint: str, handler: Callable[[TcpConnection], Awaitable[None]]
    ) -> TcpListener:
        """Accept TLS connections on ``tls://HOST:PORT`` (port 0: a free one)."""
        if self.identity is None:
            raise ConfigError(f"cannot listen on {endpoint}: TLS needs the node's identity key")
        if self._server_context is None:
            self._server_context = server_context(self.identity)
        # TLS starts after the accept (TcpListener): a socket in its handshake already holds
        # one of max_connections, so handshakes cannot pile up beyond the cap
        listener = TcpListener(self.limits, handler, scheme=SCHEME, tls=self._server_context)
        return await start_listener(endpoint, listener)


# ------------------------------------------------------------------ over a connected socket


async def tls_client_over(
    sock: socket.socket, endpoint: str, peer_id: str | None, limits: Limits = DEFAULT_LIMITS
) -> TcpConnection:
    """TLS client side over ``sock``, already connected to a byte pipe that ends at the
    peer (a relay's). ``endpoint`` names the peer in errors and ``conn.peer``. Raises
    PeerAuthFailed like ``TlsTransport.connect``, PeerUnreachable if the handshake fails."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await loop.create_connection(
            lambda: TcpConnection(limits, endpoint, scheme=SCHEME),
            sock=sock,
            ssl=_client_context(),
            server_hostname="",
            ssl_handshake_timeout=limits.read_timeout_s,
        )
    except (OSError, asyncio.TimeoutError) as error:
        raise PeerUnreachable(f"TLS handshake with {endpoint} failed: {error or 'timeout'}") from error
    return await _authenticate(conn, endpoint, peer_id)


async def tls_server_over(
    sock: socket.socket,
    identity: Identity,
    handler: Callable[[TcpConnection], Awaitable[None]],
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Serve one TLS connection arriving over ``sock`` (already connected, e.g. a relayed
    client): handshake with ``identity``'s key, run ``handler(conn)``, then close it.
    Raises PeerUnreachable if the handshake fails."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await loop.connect_accepted_socket(
            lambda: TcpConnection(limits, scheme=SCHEME),
            sock,
            ssl=_cached_server_context(identity),
            ssl_handshake_timeout=limits.read_timeout_s,
        )
    except (OSError, asyncio.TimeoutError) as error:
        raise PeerUnreachable(f"TLS handshake over a relayed socket failed: {error}") from error
    try:
        await handler(conn)
    finally:
        await conn.close()
