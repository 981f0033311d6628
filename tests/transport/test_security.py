import ipaddress
import stat

import pytest
from cryptography import x509

from splitft.config import ConfigError
from splitft.transport.security import (
    check_token,
    is_loopback,
    load_token_hashes,
    make_certs,
    read_token,
)


def test_certs_keep_only_token_hashes_on_the_server(tmp_path):
    paths = make_certs(tmp_path / "d", "gpu.example.org", clients=2)
    tokens = [read_token(paths[f"client-{i}"]) for i in range(2)]
    text = paths["tokens"].read_text()
    assert all(t not in text for t in tokens)
    hashes = load_token_hashes(paths["tokens"])
    assert sorted(hashes) == [0, 1]
    assert check_token(hashes, 0, tokens[0]) and check_token(hashes, 1, tokens[1])
    assert not check_token(hashes, 0, tokens[1])  # another client's token
    assert not check_token(hashes, 7, tokens[0])  # an unknown id
    assert not check_token(hashes, 0, "")
    for key in ("ca_key", "server_key", "client-0", "tokens"):
        assert stat.S_IMODE(paths[key].stat().st_mode) == 0o600


def test_certs_are_not_overwritten_unless_asked(tmp_path):
    make_certs(tmp_path, "localhost", clients=1)
    with pytest.raises(ConfigError, match="already exists"):
        make_certs(tmp_path, "localhost", clients=1)
    make_certs(tmp_path, "localhost", clients=1, overwrite=True)


@pytest.mark.parametrize(
    "content",
    ["[1, 2]", '{"x": "sha256:00"}', '{"0": "md5:00"}', '{"0": "sha256:zz"}', "{bad"],
)
def test_a_bad_tokens_file_is_named(tmp_path, content):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=str(path)):
        load_token_hashes(path)


def test_token_files_that_cannot_be_used(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "none.token")
    (tmp_path / "empty.token").write_text("\n")
    with pytest.raises(ConfigError, match="empty token"):
        read_token(tmp_path / "empty.token")


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")
    assert not is_loopback("example.org")


@pytest.mark.parametrize(
    ("name", "dns", "ips"),
    [
        ("gpu.example.org", {"gpu.example.org", "localhost"}, {"127.0.0.1"}),
        ("10.1.2.3", {"localhost"}, {"10.1.2.3", "127.0.0.1"}),
        ("localhost", {"localhost"}, {"127.0.0.1"}),
    ],
)
def test_the_server_certificate_names_the_server_and_loopback(tmp_path, name, dns, ips):
    paths = make_certs(tmp_path, name, clients=1)
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["server_cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == dns
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(i) for i in ips
    }
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
