"""Certificates and client tokens for a deployment.

``make_certs`` writes what a small deployment needs: a CA, a server
certificate signed by it, and one random token per client. The server keeps
only the tokens' SHA-256 hashes (``tokens.json``) and compares them in
constant time, so a leaked server folder does not let anyone act as a client.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
from pathlib import Path

from splitft.config import ConfigError

_DUMMY = hashlib.sha256(b"no such client").digest()


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _write(path: Path, data: bytes, private: bool, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: already exists (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def make_certs(
    out_dir: Path,
    server_name: str,
    clients: int,
    *,
    days: int = 365,
    overwrite: bool = False,
) -> dict[str, Path]:
    """A CA, a server certificate for ``server_name`` (also valid for
    ``localhost`` and 127.0.0.1, so a server can be tested on its own
    machine), and ``clients`` tokens; returns the paths by role.

    Raises:
        ConfigError: a file is already there (unless ``overwrite``), or
            ``clients`` is not positive.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if clients < 1:
        raise ConfigError(f"--clients {clients} is not allowed: >= 1")
    out = Path(out_dir)
    now = datetime.datetime.now(datetime.UTC)
    start, end = (
        now - datetime.timedelta(minutes=5),
        now + datetime.timedelta(days=days),
    )

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SplitFT CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for name in dict.fromkeys([server_name, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = {
        "ca": _write(out / "ca.pem", ca.public_bytes(pem), False, overwrite),
        "ca_key": _write(out / "ca.key", pem_key(ca_key), True, overwrite),
        "server_cert": _write(
            out / "server.pem", cert.public_bytes(pem), False, overwrite
        ),
        "server_key": _write(out / "server.key", pem_key(key), True, overwrite),
    }
    hashes_: dict[str, str] = {}
    for cid in range(clients):
        token = secrets.token_urlsafe(32)
        path = out / "clients" / f"client-{cid}.token"
        paths[f"client-{cid}"] = _write(path, (token + "\n").encode(), True, overwrite)
        hashes_[str(cid)] = "sha256:" + _hash(token).hex()
    text = json.dumps(hashes_, indent=2) + "\n"
    paths["tokens"] = _write(out / "tokens.json", text.encode(), True, overwrite)
    return paths


def load_token_hashes(path: Path) -> dict[int, bytes]:
    """``tokens.json``: client id -> SHA-256 digest of its token."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a tokens file (JSON): {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a tokens file: a JSON object is expected")
    hashes: dict[int, bytes] = {}
    for cid, value in data.items():
        ok = cid.isdigit() and isinstance(value, str) and value.startswith("sha256:")
        try:
            digest = bytes.fromhex(value[7:]) if ok else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(
                f"{path}: entry {cid!r} is not a client id with a 'sha256:<hex>' hash"
            )
        hashes[int(cid)] = digest
    if not hashes:
        raise ConfigError(
            f"{path}: no client tokens in it; make them with `splitft certs DIR "
            "--server-name NAME --clients N`"
        )
    return hashes


def check_tokens_cover(hashes: dict[int, bytes], path: Path, num_clients: int) -> None:
    """Every client id of the federation has a token in ``path``."""
    missing = sorted(set(range(num_clients)) - set(hashes))
    if missing:
        raise ConfigError(
            f"{path}: no token for client(s) {missing[:8]} of "
            f"federation.num_clients={num_clients}; make the certs again with "
            f"--clients {num_clients}"
        )


def check_key_pair(cert_pem: bytes, key_pem: bytes, cert: Path, key: Path) -> None:
    """The server's key is its certificate's (else TLS would fail every
    handshake while the server seemed to run)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError as e:
        raise ConfigError(f"{cert}: not a PEM certificate ({e})") from None
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: not an unencrypted PEM private key ({e})") from None
    raw = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(*raw) != private.public_key().public_bytes(*raw):
        raise ConfigError(
            f"{key} is not the key of {cert}: use the server.key made with that "
            "certificate (splitft certs)"
        )


def read_token(path: Path) -> str:
    """A client's token file, stripped."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a token file (not UTF-8 text)") from None
    if not token:
        raise ConfigError(f"{path}: empty token file")
    return token


def check_token(hashes: dict[int, bytes], client_id: int, token: str) -> bool:
    """Whether ``token`` is ``client_id``'s, in time independent of where it
    differs and of whether the id is known."""
    want = hashes.get(client_id, _DUMMY)
    return hmac.compare_digest(_hash(token), want) and client_id in hashes


def is_loopback(host: str) -> bool:
    """``localhost`` or an address of the loopback network."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
