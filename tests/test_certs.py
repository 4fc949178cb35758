"""`crosssim certs`: a CA, a SuperLink certificate whose SAN covers the hosts and hospital key pairs; keys private,
nothing overwritten."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from crosssim.certs import CA_KEY_FILE, TlsFiles, public_keys_in
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
    assert crosssim_main(["certs", str(tmp_path / "x")]) == 1  # the first call creates the CA: --host needed
    assert "no ca.pem yet; pass --host" in capsys.readouterr().err


def test_site_keys_are_openssh_p384_pairs_written_once_and_added_later(tmp_path, capsys):
    folder = tmp_path / "tls"
    assert crosssim_main(["certs", str(folder), "--host", "127.0.0.1", "--sites", "north,south"]) == 0
    assert crosssim_main(["certs", str(folder), "--sites", "east"]) == 0  # a hospital joining later
    files = TlsFiles(folder)
    assert [key.stem for key in public_keys_in(files.auth_keys)] == ["east", "north", "south"]
    for site in ("north", "south", "east"):
        private = load_ssh_private_key(files.site_key(site).read_bytes(), password=None)
        public = load_ssh_public_key(files.site_public_key(site).read_bytes())
        assert isinstance(private.curve, ec.SECP384R1) and private.public_key() == public
        assert files.site_key(site).stat().st_mode & 0o777 == 0o600
    before = files.site_key("north").read_bytes()
    capsys.readouterr()
    assert crosssim_main(["certs", str(folder), "--sites", "north"]) == 1  # a site keeps its key
    assert "already exists" in capsys.readouterr().err and files.site_key("north").read_bytes() == before
    assert crosssim_main(["certs", str(folder), "--sites", "../escape"]) == 1
    assert "names must be unique letters" in capsys.readouterr().err
    (files.auth_keys / "bad.pub").write_text("ssh-rsa AAAA not a key\n")
    with pytest.raises(ValueError, match="bad.pub: not an OpenSSH public key"):
        public_keys_in(files.auth_keys)
