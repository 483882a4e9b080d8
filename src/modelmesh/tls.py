"""TLS for the pod's external port and its pod-to-pod hops, from the settings ModelMesh reads.

The server presents ``MM_TLS_KEY_CERT_PATH`` / ``MM_TLS_PRIVATE_KEY_PATH``; with
``MM_TLS_CLIENT_AUTH`` OPTIONAL or REQUIRE it asks clients for a certificate, checked against
``MM_TLS_TRUST_CERT_PATH`` (REQUIRE refuses a client without one). A pod reaches other pods over
TLS, trusting its own certificate (pods of one deployment share it, or share its CA) and
``MM_INTERNAL_TRUST_CERTS`` (for certificate rotation), and presents its own certificate, so pods
that require client certificates accept each other when the trust paths cover the pods' CA. The
channel to the pod's own runtime stays plaintext (loopback or a Unix socket, as in ModelMesh).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from modelmesh.settings import MeshSettings


@dataclass(frozen=True)
class TlsMaterial:
    key: bytes
    cert_chain: bytes
    client_roots: bytes | None  # None: no client certificates asked for
    require_client_auth: bool
    peer_roots: bytes


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{setting}: cannot read {path}: {err.strerror or err}") from None


def _certs(paths: tuple[str, ...], setting: str) -> bytes:
    """PEM certificates from files, and from the .pem/.crt files of folders, concatenated."""
    out: list[bytes] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".pem", ".crt") and p.is_file())
            if not files:
                raise ValueError(f"{setting}: no .pem or .crt file in {raw}")
            out.extend(_read(str(f), setting) for f in files)
        else:
            out.append(_read(raw, setting))
    return b"\n".join(c.strip() for c in out) + b"\n" if out else b""


def load_tls(settings: MeshSettings) -> TlsMaterial | None:
    """The pod's TLS material, or None when TLS is off; ValueError naming the setting at fault."""
    if settings.tls_key_cert_path is None or settings.tls_private_key_path is None:
        return None
    cert_chain = _read(settings.tls_key_cert_path, "MM_TLS_KEY_CERT_PATH")
    key = _read(settings.tls_private_key_path, "MM_TLS_PRIVATE_KEY_PATH")
    if b"-----BEGIN CERTIFICATE-----" not in cert_chain:
        raise ValueError(f"MM_TLS_KEY_CERT_PATH: {settings.tls_key_cert_path} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key:
        raise ValueError(f"MM_TLS_PRIVATE_KEY_PATH: {settings.tls_private_key_path} holds no PEM private key")
    if b"ENCRYPTED" in key:
        raise ValueError(f"MM_TLS_PRIVATE_KEY_PATH: {settings.tls_private_key_path} is encrypted; "
                         "give an unencrypted PEM key")
    client_roots = None
    if settings.tls_client_auth != "NONE":
        client_roots = _certs(settings.tls_trust_cert_paths, "MM_TLS_TRUST_CERT_PATH")
    peer_roots = cert_chain + _certs(settings.internal_trust_cert_paths, "MM_INTERNAL_TRUST_CERTS")
    return TlsMaterial(key, cert_chain, client_roots, settings.tls_client_auth == "REQUIRE", peer_roots)


def server_credentials(tls: TlsMaterial) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key, tls.cert_chain)], root_certificates=tls.client_roots,
        require_client_auth=tls.require_client_auth,
    )


def peer_credentials(tls: TlsMaterial) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=tls.peer_roots, private_key=tls.key, certificate_chain=tls.cert_chain,
    )
