"""The SuperLink's TLS material and the SuperNodes' authentication keys (what ``deploy/certs.sh`` does with
openssl and ssh-keygen): a CA, the SuperLink's certificate, and OpenSSH ECDSA (P-384) key pairs, the only
kind Flower 1.42 accepts for node authentication. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey, EllipticCurvePublicKey
    from cryptography.x509 import Certificate


class DeployError(RuntimeError):
    """The topology could not be brought up; the message is one line and names the log to read."""


@dataclass(frozen=True)
class Credentials:
    """Paths of the TLS material and the SuperNodes' authentication keys in one directory."""

    directory: Path
    num_nodes: int

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "superlink.key"

    def node_key(self, i: int) -> Path:
        """SuperNode ``i``'s private key (OpenSSH format; what ``--auth-supernode-private-key`` reads)."""
        return self.directory / f"supernode-{i}"

    def node_public_key(self, i: int) -> Path:
        """SuperNode ``i``'s public key (what ``flwr supernode register`` reads)."""
        return self.directory / f"supernode-{i}.pub"


def make_credentials(
    directory: Path, num_nodes: int, *, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 365
) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` (DNS names or IPs) and ``num_nodes`` key pairs.

    Keys: EC P-384 for the CA and the SuperLink, ECDSA P-384 in OpenSSH format for the SuperNodes (the
    only kind Flower 1.42 accepts for node authentication). Certificates are valid for ``days`` days.
    Private keys are written with mode 0600.
    """

    creds = Credentials(directory, num_nodes)
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    server_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate(ca_key, ca_key.public_key(), "fedlora CA", None, days)
    server_cert = _certificate(ca_key, server_key.public_key(), hosts[0], hosts, days)
    pem, none = serialization.Encoding.PEM, serialization.NoEncryption()
    _write(creds.ca_cert, ca_cert.public_bytes(pem))
    _write(creds.server_cert, server_cert.public_bytes(pem))
    _write(creds.server_key, server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none), True)
    for i in range(num_nodes):  # the local demo plays every data owner, so it makes their keys here
        make_node_key(creds.node_key(i), f"supernode-{i}")
    return creds


def make_node_key(path: Path, comment: str = "supernode") -> str:
    """Write a SuperNode's authentication key pair: the private key at ``path`` (mode 0600) and the
    public key at ``path.pub``; returns the public key line (what ``flwr supernode register`` reads).

    ECDSA P-384 in OpenSSH format, the only kind Flower 1.42 accepts for node authentication. Run on
    the data owner's machine (``fedlora deploy keygen``): the private key never leaves it. Raises
    :class:`DeployError` before writing anything if either file exists or ``comment`` has whitespace.
    """

    public_path = path.with_name(path.name + ".pub")
    for existing in (path, public_path):
        if existing.exists():
            raise DeployError(
                f"{existing} already exists; remove it or choose another path (never overwritten)"
            )
    if not comment or any(c.isspace() for c in comment):
        raise DeployError(f"key comment {comment!r} must be one word without spaces, e.g. supernode-0")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write(path, private, True)
    ssh = serialization.Encoding.OpenSSH
    public = key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH).decode() + f" {comment}"
    _write(public_path, (public + "\n").encode())
    return public


def _certificate(
    ca_key: EllipticCurvePrivateKey,
    public_key: EllipticCurvePublicKey,
    common_name: str,
    hosts: tuple[str, ...] | None,
    days: int,
) -> Certificate:
    """A certificate signed by ``ca_key``: the CA itself if ``hosts`` is None, else a server for ``hosts``."""

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora CA")]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=hosts is None, path_length=None), critical=True)
    )
    if hosts is not None:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data`` to ``path``; a private file is created with mode 0600 (never readable by others)."""
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path.chmod(0o600)
    else:
        path.write_bytes(data)
