"""Launch errors a person can act on: one line naming the problem and the fix, exit 1, nothing started."""

import argparse
import socket

import pytest

from client.launch import DEFAULT_SUPERNODE_PORT, SUPERNODE_HOST, supernode_port
from crosssim.cli import main as crosssim_main
from crosssim.processes import first_free_port


@pytest.fixture
def held_port():
    """A loopback port some other process holds (bound and listening) for the test's duration."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    yield holder.getsockname()[1]
    holder.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_server_port_in_use(tmp_path, capsys, held_port):
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--port", str(held_port), "--classes", "a,b"]) == 1
    line = one_error_line(capsys)
    assert f"port {held_port} on 127.0.0.1 is already in use" in line and "--port" in line


def test_client_port_in_use(tmp_path, capsys, held_port):
    assert crosssim_main(["client", "--superlink", "127.0.0.1:8000", "--data", str(tmp_path),
                          "--port", str(held_port)]) == 1
    assert f"port {held_port} on 127.0.0.1 is already in use" in one_error_line(capsys)


def test_client_without_port_takes_the_first_free_one_and_says_so(capsys):
    first = first_free_port(SUPERNODE_HOST, DEFAULT_SUPERNODE_PORT)
    with socket.socket() as other_supernode:
        other_supernode.bind((SUPERNODE_HOST, first))
        port = supernode_port(argparse.Namespace(port=None))
    assert port > first
    assert f"SuperNode API on port {port} ({DEFAULT_SUPERNODE_PORT} is in use)" in capsys.readouterr().out


def test_unreachable_superlink(tmp_path, capsys, closed_port):
    assert crosssim_main(["client", "--superlink", f"127.0.0.1:{closed_port}", "--data", str(tmp_path),
                          "--connect-timeout", "0.3"]) == 1
    assert f"cannot reach the SuperLink at 127.0.0.1:{closed_port}" in one_error_line(capsys)


@pytest.mark.parametrize("content,problem", [(None, "certificate file not found"),
                                             ("not a certificate\n", "not a PEM certificate")])
def test_client_certificate_missing_or_wrong(tmp_path, capsys, content, problem):
    ca = tmp_path / "ca.crt"
    if content is not None:
        ca.write_text(content)
    assert crosssim_main(["client", "--superlink", "127.0.0.1:8000", "--data", str(tmp_path),
                          "--root-certificates", str(ca)]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"crosssim client: error: {ca}: {problem}") and "--root-certificates" in line


def test_server_certificate_that_is_not_pem(tmp_path, capsys):
    (tmp_path / "ca.crt").write_text("not a certificate\n")
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--classes", "a,b",
                          "--ssl-ca-certfile", str(tmp_path / "ca.crt"), "--ssl-certfile", str(tmp_path / "s.crt"),
                          "--ssl-keyfile", str(tmp_path / "s.key")]) == 1
    assert f"{tmp_path / 'ca.crt'}: not a PEM certificate (given with --ssl-ca-certfile)" in one_error_line(capsys)


def test_superlink_address_without_port(tmp_path, capsys):
    assert crosssim_main(["client", "--superlink", "server.example.org", "--data", str(tmp_path)]) == 1
    assert "'server.example.org' is not HOST:PORT" in one_error_line(capsys)
