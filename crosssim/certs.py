"""`crosssim certs`: a private CA and a SuperLink certificate for TLS, with the `cryptography` library.

Writes, in one folder: ``ca.pem`` (give it to every hospital: ``crosssim client --root-certificates``),
``ca.key`` (keep it offline), ``server.pem`` and ``server.key`` (the SuperLink's: ``crosssim server
--tls-dir``). The server certificate's SAN holds every given host name and IP address.
Private keys are written with mode 0600; an existing folder's files are never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
SERVER_CERT_FILE, SERVER_KEY_FILE = "server.pem", "server.key"
CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825  # the longest TLS server validity common clients accept
PRIVATE_KEY_MODE = 0o600


@dataclass(frozen=True)
class TlsFiles:
    """The files a TLS deployment needs, in one folder."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / CA_FILE

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT_FILE

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY_FILE


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CrossSim consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Create ``path`` exclusively (never overwrite), with ``mode`` when given."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, mode if mode is not None else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def write_certificates(folder: str | Path, hosts: Sequence[str], *,
                       now: datetime.datetime | None = None) -> TlsFiles:
    """A CA and a server certificate for ``hosts`` in ``folder``; refuses a folder that already holds them."""
    if not hosts:
        raise ValueError("give at least one --host (the name or IP hospitals connect to)")
    files = TlsFiles(Path(folder))
    existing = [p.name for p in (files.ca, files.server_cert, files.server_key, files.folder / CA_KEY_FILE)
                if p.exists()]
    if existing:
        raise ValueError(f"{files.folder}: already holds {', '.join(existing)}; choose an empty folder")
    files.folder.mkdir(parents=True, exist_ok=True)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("CrossSim CA")).issuer_name(_name("CrossSim CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=CA_VALIDITY_DAYS))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=SERVER_VALIDITY_DAYS))
                   .add_extension(_san(hosts), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    _write(files.folder / CA_KEY_FILE, _pem_key(ca_key), PRIVATE_KEY_MODE)
    _write(files.server_key, _pem_key(server_key), PRIVATE_KEY_MODE)
    _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return files
