"""`crosssim certs`: a private CA, a SuperLink certificate and per-hospital keys, with the `cryptography` library.

Writes, in one folder: ``ca.pem`` (give it to every hospital: ``crosssim client --root-certificates``),
``ca.key`` (keep it offline), ``server.pem`` and ``server.key`` (the SuperLink's: ``crosssim server
--tls-dir``). The server certificate's SAN holds every given host name and IP address.
With ``--sites``, one ECDSA P-384 key pair per hospital for Flower's SuperNode authentication:
``sites/NAME.key`` (that hospital's only: ``crosssim client --auth-key``) and ``auth-keys/NAME.pub``
(the server registers every one: ``crosssim server --auth-keys``), both in OpenSSH format as Flower reads them.
Private keys are written with mode 0600; an existing file is never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_FILE, CA_KEY_FILE = "ca.pem", "ca.key"
SERVER_CERT_FILE, SERVER_KEY_FILE = "server.pem", "server.key"
CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825  # the longest TLS server validity common clients accept
PRIVATE_KEY_MODE = 0o600
SITE_KEYS_DIRNAME, AUTH_KEYS_DIRNAME = "sites", "auth-keys"
SITE_KEY_SUFFIX, AUTH_KEY_SUFFIX = ".key", ".pub"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a file name on every OS, no path separators


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

    @property
    def auth_keys(self) -> Path:
        """The public keys ``crosssim server --auth-keys`` registers."""
        return self.folder / AUTH_KEYS_DIRNAME

    def site_key(self, site: str) -> Path:
        return self.folder / SITE_KEYS_DIRNAME / f"{site}{SITE_KEY_SUFFIX}"

    def site_public_key(self, site: str) -> Path:
        return self.auth_keys / f"{site}{AUTH_KEY_SUFFIX}"


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


def write_site_keys(folder: str | Path, sites: Sequence[str]) -> list[Path]:
    """One P-384 key pair per site (OpenSSH format); refuses a bad name or a site that already has keys."""
    files = TlsFiles(Path(folder))
    bad = [site for site in sites if not SITE_NAME.match(site)]
    if bad or not sites or len(set(sites)) != len(sites):
        raise ValueError(f"--sites: names must be unique letters, digits, '.', '_' or '-' (got {list(sites)})")
    existing = [str(p) for site in sites for p in (files.site_key(site), files.site_public_key(site)) if p.exists()]
    if existing:
        raise ValueError(f"{existing[0]}: already exists; a site keeps its key (choose another name to add one)")
    written = []
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())
        for path, data, mode in (
                (files.site_key(site), key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.OpenSSH,
                                                          serialization.NoEncryption()), PRIVATE_KEY_MODE),
                (files.site_public_key(site), key.public_key().public_bytes(
                    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", None)):
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, data, mode)
        written.append(files.site_key(site))
    return written


def public_keys_in(folder: str | Path) -> list[Path]:
    """The ``*.pub`` files of an auth-keys folder, each checked to be an OpenSSH NIST-curve ECDSA public key."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{path}: auth-keys folder not found (given with --auth-keys)")
    keys = sorted(path.glob(f"*{AUTH_KEY_SUFFIX}"))
    if not keys:
        raise ValueError(f"{path}: no *{AUTH_KEY_SUFFIX} public keys (write them with crosssim certs DIR --sites A,B)")
    for key in keys:
        try:
            public = serialization.load_ssh_public_key(key.read_bytes())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{key}: not an OpenSSH public key ({exc})") from None
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError(f"{key}: not an ECDSA key (Flower's SuperNode authentication needs a NIST EC curve)")
    return keys


def chosen_tls_files(tls_dir: str | None, given: Mapping[str, str | None],
                     in_folder: Callable[[TlsFiles], Sequence[Path]]) -> list[str] | None:
    """The TLS files a launcher uses: ``in_folder`` of ``--tls-dir``, or every one of the ``given`` --ssl-* flags
    (flag → value); None when neither is given (plain HTTP); ValueError for a mix."""
    values = [value for value in given.values() if value]
    if tls_dir:
        if values:
            raise ValueError(f"give either --tls-dir or {', '.join(given)}, not both")
        return [str(path) for path in in_folder(TlsFiles(Path(tls_dir)))]
    if not values:
        return None
    if len(values) != len(given):
        raise ValueError(f"TLS needs {', '.join(given)} together")
    return values
