"""Reading the TLS settings' files (``modelmesh.tls``): what is trusted, and clear errors."""

from __future__ import annotations

import pytest
import trustme

from modelmesh.settings import MeshSettings
from modelmesh.tls import load_tls


@pytest.fixture
def files(tmp_path):
    ca, other_ca = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "both.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "pod.key"))
    (tmp_path / "pod.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    trust = tmp_path / "trust"
    trust.mkdir()
    ca.cert_pem.write_to_path(str(trust / "a.pem"))
    other_ca.cert_pem.write_to_path(str(trust / "b.crt"))
    (trust / "notes.txt").write_text("not a certificate")
    return tmp_path


def settings(**env: str) -> MeshSettings:
    return MeshSettings.from_env(env)


def test_tls_is_off_without_a_certificate():
    assert load_tls(settings()) is None


def test_trust_folders_contribute_their_pem_and_crt_files(files):
    tls = load_tls(settings(MM_TLS_KEY_CERT_PATH=str(files / "pod.pem"), MM_TLS_PRIVATE_KEY_PATH=str(files / "pod.key"),
                            MM_TLS_CLIENT_AUTH="require", MM_TLS_TRUST_CERT_PATH=str(files / "trust"),
                            MM_INTERNAL_TRUST_CERTS=f"{files / 'trust' / 'b.crt'}"))
    assert tls is not None and tls.require_client_auth
    assert tls.client_roots is not None and tls.client_roots.count(b"BEGIN CERTIFICATE") == 2
    assert b"not a certificate" not in tls.client_roots
    # pods trust their own certificate plus the internal trust certificates
    assert tls.peer_roots.startswith(tls.cert_chain) and tls.peer_roots.count(b"BEGIN CERTIFICATE") == 2


@pytest.mark.parametrize(("cert", "key", "message"), [
    ("pod.key", "pod.key", "MM_TLS_KEY_CERT_PATH: .* holds no PEM certificate"),
    ("pod.pem", "pod.pem", "MM_TLS_PRIVATE_KEY_PATH: .* holds no PEM private key"),
    ("pod.pem", "missing.key", "MM_TLS_PRIVATE_KEY_PATH: cannot read .*missing.key"),
])
def test_unusable_files_are_named(files, cert, key, message):
    with pytest.raises(ValueError, match=message):
        load_tls(settings(MM_TLS_KEY_CERT_PATH=str(files / cert), MM_TLS_PRIVATE_KEY_PATH=str(files / key)))


def test_an_encrypted_key_or_a_passphrase_is_refused(files):
    encrypted = files / "encrypted.key"
    encrypted.write_bytes(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="is encrypted"):
        load_tls(settings(MM_TLS_KEY_CERT_PATH=str(files / "pod.pem"), MM_TLS_PRIVATE_KEY_PATH=str(encrypted)))
    with pytest.raises(ValueError, match="encrypted private keys are not supported"):
        settings(MM_TLS_PRIVATE_KEY_PASSPHRASE="secret")


def test_an_empty_trust_folder_is_an_error(files):
    (files / "empty").mkdir()
    with pytest.raises(ValueError, match="MM_TLS_TRUST_CERT_PATH: no .pem or .crt file"):
        load_tls(settings(MM_TLS_KEY_CERT_PATH=str(files / "pod.pem"), MM_TLS_PRIVATE_KEY_PATH=str(files / "pod.key"),
                          MM_TLS_CLIENT_AUTH="OPTIONAL", MM_TLS_TRUST_CERT_PATH=str(files / "empty")))
