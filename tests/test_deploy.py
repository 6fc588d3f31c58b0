"""Deployment material: the certificates and node keys, and that Flower accepts them.

The unit tests check the files with ``cryptography``; the slow test starts a real
``flower-superlink`` with TLS and SuperNode authentication, registers one node key with
``flwr supernode register`` and checks that the registered SuperNode comes online while
one with an unregistered key is refused.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import BIN, flwr_json, free_ports, launched, listening, tail, wait_for

from server.certs import CERT_FILES, make_certs, make_node_key

# ---------------------------------------------------------------------------------------
# Unit tests
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_files_and_permissions(certs: dict[str, Path]) -> None:
    assert set(certs) == set(CERT_FILES)
    for key, path in certs.items():
        assert path.is_absolute() and path.name == CERT_FILES[key]
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if key.endswith("_key") else 0o644), (key, oct(mode))


def test_server_cert_chains_to_ca(certs: dict[str, Path]) -> None:
    ca, server = _cert(certs["ca_cert"]), _cert(certs["server_cert"])
    server.verify_directly_issued_by(ca)  # issuer name and signature; raises if wrong
    ca.verify_directly_issued_by(ca)  # a self-signed root
    # The verifier a TLS client would run, with the CA as the only trust anchor.
    store = x509.verification.Store([ca])
    verifier = x509.verification.PolicyBuilder().store(store).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )
    chain = verifier.verify(server, [])
    assert chain[-1] == ca
    dns_verifier = x509.verification.PolicyBuilder().store(store).build_server_verifier(
        x509.DNSName("localhost")
    )
    dns_verifier.verify(server, [])
    # A second, unrelated CA must not vouch for this server.
    other_ca = _cert(make_certs(certs["ca_cert"].parent / "other")["ca_cert"])
    with pytest.raises(x509.verification.VerificationError):
        x509.verification.PolicyBuilder().store(
            x509.verification.Store([other_ca])
        ).build_server_verifier(x509.DNSName("localhost")).verify(server, [])


def test_server_cert_extensions_and_validity(certs: dict[str, Path]) -> None:
    ca, server = _cert(certs["ca_cert"]), _cert(certs["server_cert"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    now = dt.datetime.now(dt.UTC)
    for cert in (ca, server):
        assert cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        assert cert.not_valid_after_utc - now > dt.timedelta(days=364)
    # The key on disk is the one the certificate was issued for.
    key = serialization.load_pem_private_key(certs["server_key"].read_bytes(), None)
    assert key.public_key() == server.public_key()
    csr = x509.load_pem_x509_csr(certs["server_csr"].read_bytes())
    assert csr.is_signature_valid and csr.public_key() == server.public_key()


def test_certs_custom_hosts_and_days(tmp_path: Path) -> None:
    paths = make_certs(tmp_path, hosts=["10.0.0.5", "::1", "link.example.org"], days=2)
    server = _cert(paths["server_cert"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    }
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    lifetime = server.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=1) < lifetime <= dt.timedelta(days=2)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"hosts": []}, "hosts"),
        ({"hosts": "localhost"}, "hosts"),
        ({"hosts": ["127.0.0.1", ""]}, "hosts"),
        ({"hosts": ["bad host"]}, "hosts"),
        ({"hosts": ["-dash.example"]}, "hosts"),
        ({"days": 0}, "days"),
        ({"days": 1.5}, "days"),
    ],
)
def test_certs_reject_bad_arguments(tmp_path: Path, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        make_certs(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # validated before anything is written


def test_certs_refuse_to_overwrite(tmp_path: Path) -> None:
    first = make_certs(tmp_path)
    before = {k: p.read_bytes() for k, p in first.items()}
    first["server_key"].unlink()  # even one existing file blocks the whole set
    with pytest.raises(FileExistsError, match="ca.crt"):
        make_certs(tmp_path)
    assert first["ca_cert"].read_bytes() == before["ca_cert"]
    assert not first["server_key"].exists()
    first["ca_cert"].chmod(0o666)
    again = make_certs(tmp_path, overwrite=True)
    assert again["ca_cert"].read_bytes() != before["ca_cert"]
    assert stat.S_IMODE(again["server_key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(again["ca_cert"].stat().st_mode) == 0o644


def test_node_key_format(tmp_path: Path) -> None:
    paths = make_node_key(tmp_path, "merchant-01")
    assert paths == {
        "private_key": tmp_path.resolve() / "merchant-01",
        "public_key": tmp_path.resolve() / "merchant-01.pub",
    }
    assert stat.S_IMODE(paths["private_key"].stat().st_mode) == 0o600
    # Flower loads both with the OpenSSH loaders (flower_supernode.py, register.py).
    private_bytes = paths["private_key"].read_bytes()
    assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    private = serialization.load_ssh_private_key(private_bytes, None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    public_text = paths["public_key"].read_text()
    assert public_text.startswith("ecdsa-sha2-nistp384 ")
    assert public_text.rstrip("\n").split(" ")[-1] == "merchant-01"
    public = serialization.load_ssh_public_key(public_text.encode())
    assert public == private.public_key()
    assert make_node_key(tmp_path, "other")["public_key"].read_text() != public_text


def test_node_key_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = make_node_key(tmp_path, "node")
    before = paths["private_key"].read_bytes()
    with pytest.raises(FileExistsError, match="node"):
        make_node_key(tmp_path, "node")
    assert paths["private_key"].read_bytes() == before
    again = make_node_key(tmp_path, "node", overwrite=True)
    assert again["private_key"].read_bytes() != before


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "sp ace", "x" * 65, "é"])
def test_node_key_rejects_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        make_node_key(tmp_path, name)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------
# Integration: a real SuperLink with TLS and SuperNode authentication
# ---------------------------------------------------------------------------------------

CONNECTION = "fedecay-test"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_superlink_accepts_registered_node_only(tmp_path: Path) -> None:
    for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
        if not (BIN / tool).exists():
            pytest.skip(f"{tool} not installed beside {sys.executable}")
    certs = make_certs(tmp_path / "certs")
    other_ca = make_certs(tmp_path / "other-ca")["ca_cert"]
    known = make_node_key(tmp_path / "keys", "merchant-a")
    stranger = make_node_key(tmp_path / "keys", "stranger")
    link_port, port_a, port_b = free_ports(3)
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # it spawns flower-superexec
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{certs["ca_cert"]}"\n\n'
        f'[superlink.by-name]\naddress = "localhost:{link_port}"\n'
        f'root-certificates = "{certs["ca_cert"]}"\n\n'
        f'[superlink.wrong-ca]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{other_ca}"\n'
    )
    link_log, log_a, log_b = (tmp_path / f"{n}.log" for n in ("superlink", "node-a", "node-b"))

    def supernode(key: dict[str, Path], port: int, data: str) -> list[str]:
        return [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{link_port}",
            "--root-certificates", str(certs["ca_cert"]),
            "--auth-supernode-private-key", str(key["private_key"]),
            "--node-config", f"data-path='{tmp_path / data}'",
            "--port", str(port),
        ]

    superlink_cmd = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(certs["ca_cert"]),
        "--ssl-certfile", str(certs["server_cert"]),
        "--ssl-keyfile", str(certs["server_key"]),
        "--enable-supernode-auth",
        "--host", "127.0.0.1",
        "--port", str(link_port),
    ]
    with launched(superlink_cmd, link_log, env) as link:
        wait_for(
            lambda: link.poll() is not None or listening(link_port), 60, "the SuperLink", link_log
        )
        assert link.poll() is None, tail(link_log)

        # TLS is real: the same address with another CA is refused, the DNS SAN works.
        assert not flwr_json(["supernode", "list", "wrong-ca"], env)["success"]
        assert flwr_json(["supernode", "list", "by-name"], env)["success"]

        registered = flwr_json(["supernode", "register", str(known["public_key"]), CONNECTION], env)
        assert registered["success"], registered
        node_id = str(registered["node-id"])

        with (
            launched(supernode(known, port_a, "shard-a"), log_a, env) as node_a,
            launched(supernode(stranger, port_b, "shard-b"), log_b, env) as node_b,
        ):
            wait_for(lambda: node_b.poll() is not None, 45, "the stranger's exit", log_b)
            refused = log_b.read_text(errors="replace")
            assert node_b.returncode != 0
            assert "[code: 2004] Failed to activate SuperNode." in refused, tail(log_b)
            assert "No SuperNode found with the given public key" in link_log.read_text()

            def online() -> list[dict]:
                listed = flwr_json(["supernode", "list"], env)
                assert listed["success"], listed
                return [n for n in listed["nodes"] if n["status"] == "online"]

            wait_for(lambda: bool(online()), 30, "the registered SuperNode online", log_a)
            assert [n["node-id"] for n in online()] == [node_id]
            assert node_a.poll() is None, tail(log_a)
            assert f"SuperNode ID: {node_id}" in log_a.read_text(errors="replace")
