"""`crosssim certs`: a CA and a SuperLink certificate whose SAN covers the hosts, keys private, nothing overwritten."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from crosssim.certs import CA_KEY_FILE
from crosssim.cli import main as crosssim_main


def test_server_certificate_is_signed_by_the_ca_and_covers_every_host(tmp_path, capsys):
    folder = tmp_path / "tls"
    assert crosssim_main(["certs", str(folder), "--host", "fl.example.org", "127.0.0.1"]) == 0
    assert "--root-certificates" in capsys.readouterr().out
    ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the CA did not sign it
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    for key in ("server.key", CA_KEY_FILE):
        assert stat.S_IMODE((folder / key).stat().st_mode) == 0o600


def test_existing_certificates_are_never_overwritten(tmp_path, capsys):
    folder = tmp_path / "tls"
    assert crosssim_main(["certs", str(folder), "--host", "localhost"]) == 0
    before = (folder / "ca.pem").read_bytes()
    assert crosssim_main(["certs", str(folder), "--host", "localhost"]) == 1
    assert "already holds" in capsys.readouterr().err
    assert (folder / "ca.pem").read_bytes() == before


def test_server_tls_dir_passes_its_three_files(tmp_path, capsys):
    assert crosssim_main(["certs", str(tmp_path / "tls"), "--host", "127.0.0.1"]) == 0
    capsys.readouterr()
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--tls-dir", str(tmp_path / "tls"),
                          "--classes", "a,b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"--ssl-certfile {tmp_path / 'tls' / 'server.pem'}" in out and "--insecure" not in out
    with pytest.raises(SystemExit):
        crosssim_main(["certs", str(tmp_path / "x")])  # --host is required
