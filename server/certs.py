"""TLS certificates and SuperNode keys for a real Flower deployment.

``make_certs`` writes a test CA and a server certificate signed by it, the files
``flower-superlink`` takes through ``--ssl-ca-certfile``, ``--ssl-certfile`` and
``--ssl-keyfile`` (every SuperNode and the ``flwr`` CLI then trust ``ca.crt``).
``make_node_key`` writes one merchant's SuperNode key pair: the private key for
``flower-supernode --auth-supernode-private-key`` and the ``.pub`` for
``flwr supernode register``. Flower 1.42 reads the private key with
``load_ssh_private_key`` and the public key with ``load_ssh_public_key``, so both are
written in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` would.

The CA is meant for tests and pilots: its key sits unencrypted next to the
certificates. A production SuperLink should get its certificate from a real CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CERT_FILES: dict[str, str] = {
    "ca_cert": "ca.crt",
    "ca_key": "ca.key",
    "server_csr": "server.csr",
    "server_cert": "server.crt",
    "server_key": "server.key",
}
_PRIVATE = {"ca_key", "server_key"}

_CURVE = ec.SECP384R1  # the curve Flower's node authentication is documented with
_CLOCK_SKEW = dt.timedelta(minutes=5)  # backdate so a slightly slow clock still accepts
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def make_certs(
    out_dir: Path,
    *,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    days: int = 365,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a test CA and a SuperLink server certificate signed by it.

    Parameters
    ----------
    out_dir : Path
        Directory for ``ca.crt``, ``ca.key``, ``server.csr``, ``server.crt`` and
        ``server.key``; created if missing.
    hosts : Sequence[str]
        Every address the SuperNodes and the CLI use to reach the SuperLink. IP
        addresses become ``IPAddress`` SAN entries, names ``DNSName`` entries; the
        first host is also the certificate's common name.
    days : int
        Validity of both certificates, counted from now.
    overwrite : bool
        Replace existing files instead of refusing.

    Returns
    -------
    dict[str, Path]
        Absolute paths under the keys ``ca_cert``, ``ca_key``, ``server_csr``,
        ``server_cert`` and ``server_key``.
    """
    san = subject_alt_names(hosts)
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")
    paths = _target_paths(out_dir, CERT_FILES, overwrite=overwrite)

    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - _CLOCK_SKEW, now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedecay"),
        x509.NameAttribute(NameOID.COMMON_NAME, "fedecay test CA"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    # The server certificate is issued from a CSR, as a real CA would: the request
    # carries the subject, the public key and the SAN.
    server_key = ec.generate_private_key(_CURVE())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedecay"),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
        ]))
        .add_extension(san, critical=False)
        .sign(server_key, hashes.SHA384())
    )
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    contents = {
        "ca_cert": ca_cert.public_bytes(pem),
        "ca_key": _private_pem(ca_key),
        "server_csr": csr.public_bytes(pem),
        "server_cert": server_cert.public_bytes(pem),
        "server_key": _private_pem(server_key),
    }
    _install(paths, contents, private=_PRIVATE)
    log.info("wrote a test CA and a server certificate for %s to %s", list(hosts), out_dir)
    return paths


def make_node_key(out_dir: Path, name: str = "node", *, overwrite: bool = False) -> dict[str, Path]:
    """Write an ECDSA P-384 key pair for SuperNode authentication.

    Parameters
    ----------
    out_dir : Path
        Directory for the key files; created if missing.
    name : str
        File name of the private key (``<name>``); the public key is ``<name>.pub``
        and carries ``name`` as its comment. Letters, digits, ``.``, ``_`` and ``-``.
    overwrite : bool
        Replace existing files instead of refusing.

    Returns
    -------
    dict[str, Path]
        Absolute paths under the keys ``private_key`` (OpenSSH PEM, mode 0600, for
        ``--auth-supernode-private-key``) and ``public_key`` (one line
        ``ecdsa-sha2-nistp384 AAAA… <name>``, for ``flwr supernode register``).
    """
    if not isinstance(name, str) or not _NODE_NAME.fullmatch(name):
        raise ValueError(
            f"name must be 1-64 letters, digits, '.', '_' or '-' and start with a letter "
            f"or digit, got {name!r}"
        )
    if name.endswith(".pub"):  # node "a"'s public key is a.pub
        raise ValueError(f"name must not end in '.pub' (the public key's suffix), got {name!r}")
    paths = _target_paths(
        out_dir, {"private_key": name, "public_key": f"{name}.pub"}, overwrite=overwrite
    )
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _install(paths, {"private_key": private, "public_key": public + f" {name}\n".encode()},
             private={"private_key"})
    log.info("wrote SuperNode key pair %s(.pub) to %s", name, out_dir)
    return paths


def subject_alt_names(hosts: Sequence[str], what: str = "hosts"
                      ) -> x509.SubjectAlternativeName:
    """The server certificate's SAN for ``hosts`` (IP addresses or DNS names); errors
    name them as ``what`` (the command line's ``--host``)."""
    # A bare string is a Sequence[str] too: "localhost" would become nine hosts.
    if isinstance(hosts, str | bytes) or not isinstance(hosts, Sequence):
        raise ValueError(f"{what} must be a sequence of host names, got {hosts!r}")
    if not hosts:
        raise ValueError(f"{what} must name at least one IP address or DNS name")
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # drop repeats, keep the order
        if not isinstance(host, str) or not host.strip():
            raise ValueError(f"{what} holds an empty or non-string entry: {host!r}")
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.rstrip(".").split(".")
        if labels[0] == "*":  # a wildcard is allowed as the leftmost label only
            labels = labels[1:]
        if len(host) > 253 or not labels or not all(_DNS_LABEL.match(x) for x in labels):
            raise ValueError(f"{what} holds {host!r}, neither an IP address nor a DNS name")
        if labels[-1].isdigit():  # no top-level domain is all digits (RFC 3696 2)
            raise ValueError(f"{what} holds {host!r}: all numbers, so not a DNS name, and not "
                             "an IP address (IPv4 is four numbers 0-255: 192.0.2.10)")
        entries.append(x509.DNSName(host.rstrip(".")))
    return x509.SubjectAlternativeName(entries)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _target_paths(out_dir: Path, names: dict[str, str], *, overwrite: bool) -> dict[str, Path]:
    """Resolve the output paths and refuse, before anything is created, to clobber one."""
    out_dir = Path(out_dir).expanduser().resolve()
    for parent in (out_dir, *out_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "it" if parent == out_dir else str(parent)
                raise NotADirectoryError(
                    f"cannot write into {out_dir}: {what} is a file, not a folder")
            break
    paths = {key: out_dir / name for key, name in names.items()}
    for path in paths.values():
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(f"cannot write {path}: a folder of that name is in the way")
        if not overwrite and (path.exists() or path.is_symlink()):
            raise FileExistsError(f"{path} already exists; use --overwrite to replace it")
    return paths


def _install(paths: dict[str, Path], contents: dict[str, bytes], *, private: set[str]) -> None:
    """Put every file in place or none of them.

    A CA certificate whose key was never written is worse than no CA at all. So the
    files are first written into a hidden folder beside their targets (the same file
    system, so a rename is atomic), then renamed into place; on any failure what was
    placed is removed, the files it replaced are put back, and folders this call
    created are removed again.
    """
    out_dir = next(iter(paths.values())).parent
    created = _make_dirs(out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix=".fedecay-", dir=out_dir) as staging:
            _swap_in(paths, contents, private, Path(staging))
    except BaseException:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _swap_in(paths: dict[str, Path], contents: dict[str, bytes], private: set[str],
             staging: Path) -> None:
    staged = {key: staging / path.name for key, path in paths.items()}
    for key, path in staged.items():
        try:
            _write(path, contents[key], private=key in private)
        except OSError as err:  # name the file the user asked for, not the staging copy
            raise type(err)(err.errno, err.strerror, str(paths[key])) from err
    placed: list[Path] = []
    parked: dict[Path, Path] = {}  # replaced file -> where it waits in the staging folder
    try:
        for key, path in paths.items():
            if path.exists() or path.is_symlink():  # a symlink is replaced, not followed
                parked[path] = staging / f"{path.name}.old"
                os.replace(path, parked[path])
            os.replace(staged[key], path)
            placed.append(path)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        for path, old in parked.items():
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise


def _make_dirs(folder: Path) -> list[Path]:
    """``mkdir -p`` that returns the folders it created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    created: list[Path] = []
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
    except BaseException:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return created


def _write(path: Path, data: bytes, *, private: bool) -> None:
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(fd, mode)  # the umask may differ
        file.write(data)
        file.flush()
        os.fsync(fd)
