"""docker/Dockerfile and docker/compose.yaml, checked by parsing (no Docker engine): commands, mounts, pins, sources."""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import functools
import io
import json
import re
import shlex
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from crosssim.boundary import final_checkpoint
from crosssim.cli import build_parser
from crosssim.config import CONFIGS_DIR
from crosssim.data.synth import CLASSES, load_preset

REPO = Path(__file__).resolve().parents[1]
DOCKER_DIR = REPO / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE = DOCKER_DIR / "compose.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
COMPOSE_DOC: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE_DOC["services"]
PINNED_PACKAGES = ("torch", "torchvision")  # installed from the PyTorch wheel index, pinned as in pyproject.toml
ANY_ADDRESS = "0.0.0.0"  # what a server must bind inside a container to be reachable from other containers
LOOPBACK = "127.0.0.1"
SECRETS_DIR = PurePosixPath("/run/secrets")  # where Compose mounts a service's secrets
DOC_LINE = re.compile(r"^#   (\S.*)$")  # a documented shell command in a file's header: '#' and three spaces
# Top-level folders .gitignore names ('/runs/'): local output a fresh clone lacks, so being there proves nothing.
UNTRACKED_TOP = {entry.strip("/") for entry in (REPO / ".gitignore").read_text().split()
                 if re.fullmatch(r"/[^/*]+/", entry)}


@dataclass(frozen=True)
class Mount:
    """One short-syntax entry of a service's `volumes`."""

    source: str  # a named volume, or a host path relative to docker/
    target: str
    read_only: bool

    @property
    def is_bind(self) -> bool:
        """A host folder or file (not a named volume)."""
        return self.source.startswith((".", "/"))


@functools.cache
def crosssim_parser() -> argparse.ArgumentParser:
    """CrossSim's own `crosssim` argument parser, every sub-command registered."""
    return build_parser()


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `crosssim NAME`."""
    action = next(a for a in crosssim_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def crosssim_errors(argv: Sequence[str]) -> list[str]:
    """Why `crosssim ARGV` would not run: argparse's error or exit, or a long flag not spelled out in full."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = crosssim_parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse exits on errors (2) and on --help (0): neither runs the command
        return [f"crosssim {shlex.join(argv)}: exits {exc.code} while parsing {stderr.getvalue().strip()!r}"]
    flags = subcommand_parser(args.command)._option_string_actions
    # argparse accepts any unambiguous prefix, so a renamed --min-sites would still take --min-sites: require it whole.
    return [f"crosssim {args.command}: {token!r} is not one of its flags" for token in argv
            if token.startswith("--") and token.split("=", 1)[0] not in flags]


def parsed(argv: Sequence[str]) -> argparse.Namespace:
    """`crosssim ARGV` parsed, after asserting that it parses cleanly."""
    assert crosssim_errors(argv) == []
    return crosssim_parser().parse_args(list(argv))


def command(service: Mapping[str, Any]) -> list[str]:
    """A service's `command`, which must be exec form: a list of strings (the image's ENTRYPOINT is crosssim)."""
    argv = service["command"]
    assert isinstance(argv, list) and all(isinstance(token, str) for token in argv), argv
    return argv


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    """A service's `volumes` entries, SOURCE:TARGET[:MODE]."""
    out: list[Mount] = []
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        assert len(mode) <= 1, f"unexpected volume spec {spec!r}"
        out.append(Mount(source, target, "ro" in "".join(mode).split(",")))
    return out


def repo_path(source: str) -> PurePosixPath:
    """A compose host path (relative to docker/) as a path relative to the repository root."""
    return PurePosixPath((DOCKER_DIR / source).resolve().relative_to(REPO))


def host_path(service: Mapping[str, Any], container_path: str) -> PurePosixPath:
    """The repository-relative host path that CONTAINER_PATH of SERVICE lies on, through its bind mounts."""
    path = PurePosixPath(container_path)
    for mount in mounts(service):
        if mount.is_bind and path.is_relative_to(mount.target):
            return repo_path(mount.source) / path.relative_to(mount.target)
    raise AssertionError(f"{container_path} is on no bind mount of {service['command'][0]}")


def writable(service: Mapping[str, Any], container_path: str) -> bool:
    """Whether CONTAINER_PATH lies on a writable bind mount (so what is written there reaches the host)."""
    path = PurePosixPath(container_path)
    return any(m.is_bind and not m.read_only and path.is_relative_to(m.target) for m in mounts(service))


def site_mount_errors(service: Mapping[str, Any]) -> list[str]:
    """Why a service's DICOM folders are exposed: a --data folder not mounted, or a site folder mounted writable."""
    data = getattr(parsed(command(service)), "data", None)
    errors = [] if data is None or any(m.target == data for m in mounts(service)) else [f"--data {data} not mounted"]
    for mount in mounts(service):
        site = mount.target == data or mount.is_bind and repo_path(mount.source).is_relative_to("data")
        if site and not mount.read_only:
            errors.append(f"site folder {mount.source} mounted writable at {mount.target} (add :ro)")
    return errors


def services_running(name: str) -> dict[str, dict[str, Any]]:
    """The services whose command is `crosssim NAME`."""
    return {key: service for key, service in SERVICES.items() if command(service)[0] == name}


def container_ports(service: Mapping[str, Any]) -> list[int]:
    """Container side of a service's published `ports` (HOST:CONTAINER or IP:HOST:CONTAINER)."""
    return [int(spec.rsplit(":", 1)[-1]) for spec in service.get("ports", [])]


def documented_commands(path: Path) -> list[list[str]]:
    """Shell commands a file's header documents ('#   CMD  # note' lines), split at '&&'."""
    out: list[list[str]] = []
    for line in path.read_text().splitlines():
        match = DOC_LINE.match(line)
        if match:
            text = re.split(r"\s+#\s", match.group(1))[0]
            out.extend(shlex.split(part) for part in text.split("&&"))
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of docker/Dockerfile, continued lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
        else:
            logical.append(pending)
            pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return [(keyword.upper(), rest) for keyword, rest in (text.split(None, 1) for text in logical)]


def instructions(keyword: str) -> list[str]:
    """Arguments of every KEYWORD instruction, in order."""
    return [rest for key, rest in dockerfile_instructions() if key == keyword]


def pyproject_pins() -> dict[str, str]:
    """name → version of pyproject.toml's `name==version` dependencies."""
    pins = (dep.split("==") for dep in PYPROJECT["project"]["dependencies"] if "==" in dep)
    return {name.split("[")[0]: version for name, version in pins}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_command_is_a_crosssim_command_with_its_exact_flags(name: str) -> None:
    """Each service's command parses with CrossSim's parser, every flag spelled as the CLI defines it."""
    assert crosssim_errors(command(SERVICES[name])) == []


@pytest.mark.parametrize("argv", [
    ["client", "--superlink", "server:8000", "--data", "/data", "--bogus"],  # unknown flag
    ["server", "--out", "/runs/federated", "--min-site", "3"],  # argparse takes it for --min-sites: a rename
    ["client", "--superlink", "server:8000"],  # required --data missing
    ["hospital", "--data", "/data"],  # no such sub-command
    ["server", "--out", "/runs/federated", "--port", "eighty"],  # not an int
    ["evaluate", "--checkpoint", "a.pt", "--data", "/data", "--out", "/o", "--adapt", "magic"],  # not a choice
    ["client", "--help"],  # prints help and exits instead of running
], ids=["bogus-flag", "abbreviated-flag", "missing-required", "unknown-command", "bad-type", "bad-choice", "help"])
def test_command_validator_rejects_broken_commands(argv: list[str]) -> None:
    """The validator reports each kind of broken command instead of passing it (argparse's exit is caught)."""
    assert crosssim_errors(argv)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_site_folders_are_mounted_read_only(name: str) -> None:
    """Every --data folder is mounted, and every DICOM/site folder (data/ on the host, /data inside) is :ro."""
    assert site_mount_errors(SERVICES[name]) == []


def test_site_mount_check_rejects_writable_or_missing_data() -> None:
    """The read-only check fails a hospital whose folder lost ':ro', and one whose --data is not mounted."""
    writable_site = copy.deepcopy(SERVICES["hospital-a"])
    writable_site["volumes"] = [spec.removesuffix(":ro") for spec in writable_site["volumes"]]
    unmounted = copy.deepcopy(SERVICES["hospital-a"])
    unmounted["volumes"] = [spec for spec in unmounted["volumes"] if ":/data" not in spec]
    assert any("writable" in error for error in site_mount_errors(writable_site))
    assert any("not mounted" in error for error in site_mount_errors(unmounted))


def test_compose_hospitals_and_target_are_the_synth_sites() -> None:
    """`crosssim synth` (the documented first step) writes exactly the sites the hospital and target services read."""
    sites, _, _ = load_preset("default")
    sources = {site.name for site in sites if site.role == "source"}
    (target,) = [site.name for site in sites if site.role == "target"]
    (synth,) = [argv for argv in documented_commands(COMPOSE) if argv[:2] == ["crosssim", "synth"]]
    out = PurePosixPath(parsed(synth[1:]).out)
    clients = services_running("client")
    assert set(clients) == sources
    for name, service in clients.items():
        args = parsed(command(service))
        assert args.site == name and not args.unlabeled
        assert host_path(service, args.data) == out / name
    (evaluate,) = services_running("evaluate").values()
    assert host_path(evaluate, parsed(command(evaluate)).data) == out / target
    (server,) = services_running("server").values()
    assert parsed(command(server)).classes.split(",") == list(CLASSES)


def test_compose_bind_sources_exist_or_come_from_documented_commands() -> None:
    """Every host folder or file compose mounts is in a fresh clone, or a command in the compose header creates it."""
    made: set[PurePosixPath] = set()
    for argv in documented_commands(COMPOSE):
        if argv[:2] == ["crosssim", "synth"]:
            args = parsed(argv[1:])
            made.update(PurePosixPath(args.out) / site.name for site in load_preset(args.preset)[0])
        elif argv[:2] == ["crosssim", "export"]:
            made.add(PurePosixPath(parsed(argv[1:]).out))
        elif argv[:2] == ["mkdir", "-p"]:
            made.update(PurePosixPath(folder) for folder in argv[2:])
        if ">" in argv:
            made.add(PurePosixPath(argv[argv.index(">") + 1]))
    sources = [repo_path(m.source) for service in SERVICES.values() for m in mounts(service) if m.is_bind]
    sources += [repo_path(secret["file"]) for secret in COMPOSE_DOC.get("secrets", {}).values()]
    in_clone = [source for source in sources if source.parts[0] not in UNTRACKED_TOP and (REPO / source).exists()]
    assert {"data", "runs"} <= UNTRACKED_TOP
    assert sources and [str(source) for source in sources if source not in made and source not in in_clone] == []
    named = {m.source for service in SERVICES.values() for m in mounts(service) if not m.is_bind}
    assert named <= set(COMPOSE_DOC.get("volumes", {})), "named volumes must be declared at the top level"


def test_compose_documented_commands_parse_and_name_real_services() -> None:
    """The header's `crosssim` commands parse; its `docker compose`/`docker build` commands fit this file's layout."""
    profiles = {profile for service in SERVICES.values() for profile in service.get("profiles", [])}
    kinds: set[str] = set()
    for argv in documented_commands(COMPOSE) + documented_commands(DOCKERFILE):
        if argv[0] == "crosssim":
            assert crosssim_errors(argv[1:]) == []
        elif argv[:2] == ["docker", "compose"]:
            assert REPO / argv[argv.index("-f") + 1] == COMPOSE
            if "--profile" in argv:
                assert argv[argv.index("--profile") + 1] in profiles
            verb = next(token for token in argv if token in ("up", "run"))
            named = [token for token in argv[argv.index(verb) + 1:] if not token.startswith("-")]
            assert named and set(named) <= set(SERVICES)
        elif argv[:2] == ["docker", "build"]:
            assert REPO / argv[argv.index("-f") + 1] == DOCKERFILE
            contexts = {(DOCKER_DIR / service["build"]["context"]).resolve() for service in SERVICES.values()}
            assert contexts == {(REPO / argv[-1]).resolve()}
            assert {service["image"] for service in SERVICES.values()} == {f"{argv[argv.index('-t') + 1]}:latest"}
        kinds.add(" ".join(argv[:2]))
    assert {"crosssim synth", "crosssim export", "docker compose", "docker build"} <= kinds


def test_compose_run_flows_from_server_to_target_to_serve() -> None:
    """The server's final.pt is the target's checkpoint and export's input; export's folder is what serve reads."""
    (server,) = services_running("server").values()
    (evaluate,) = services_running("evaluate").values()
    run = parsed(command(server)).out
    final = host_path(server, str(final_checkpoint(run)))
    target = parsed(command(evaluate))
    assert writable(server, run) and writable(evaluate, target.out)
    assert host_path(evaluate, target.checkpoint) == final
    (export,) = [argv for argv in documented_commands(COMPOSE) if argv[:2] == ["crosssim", "export"]]
    exported = parsed(export[1:])
    assert PurePosixPath(exported.checkpoint) == final
    assert PurePosixPath(exported.data) == host_path(evaluate, target.data)
    served = services_running("serve").values()
    assert {parsed(command(serve)).int8 for serve in served} == {False, True}, "compose serves float and int8"
    assert exported.quantize == "int8"
    for serve in served:
        assert host_path(serve, parsed(command(serve)).model_dir) == PurePosixPath(exported.out)


def test_compose_ports_and_addresses_agree() -> None:
    """Server and serve bind all interfaces on the port they publish; hospitals dial the server's service and port."""
    ((server_name, server),) = services_running("server").items()
    link = parsed(command(server))
    assert link.host == ANY_ADDRESS and container_ports(server) == [link.port]
    for service in services_running("client").values():
        assert parsed(command(service)).superlink == f"{server_name}:{link.port}"
        assert server_name in service["depends_on"]
    for serve in services_running("serve").values():
        args = parsed(command(serve))
        assert args.host == ANY_ADDRESS and container_ports(serve) == [args.port]
        assert all(spec.startswith(f"{LOOPBACK}:") for spec in serve["ports"]), "serve publishes on loopback only"
        assert instructions("EXPOSE") == [str(args.port)]
        health = re.search(r"http://[^/:]+:(\d+)/health", " ".join(serve["healthcheck"]["test"]))
        assert health and int(health.group(1)) == args.port


def test_compose_serve_has_no_writable_storage_and_reads_its_token_secret() -> None:
    """serve: read-only root, read-only mounts, no image VOLUME (anonymous writable volumes), token from a secret."""
    assert instructions("VOLUME") == []
    for serve in services_running("serve").values():
        args = parsed(command(serve))
        assert serve["read_only"] is True and all(m.read_only for m in mounts(serve))
        token = PurePosixPath(args.token_file)
        assert token.parent == SECRETS_DIR and token.name in serve["secrets"]
        assert "file" in COMPOSE_DOC["secrets"][token.name]


def test_dockerfile_entrypoint_runs_crosssim() -> None:
    """ENTRYPOINT is the `crosssim` console script of pyproject.toml; the default CMD is a valid `crosssim --help`."""
    (entrypoint,) = instructions("ENTRYPOINT")
    (cmd,) = instructions("CMD")
    assert json.loads(entrypoint) == ["crosssim"]
    assert PYPROJECT["project"]["scripts"]["crosssim"] == "crosssim.cli:main"
    with contextlib.redirect_stdout(io.StringIO()) as shown, pytest.raises(SystemExit) as exited:
        crosssim_parser().parse_args(json.loads(cmd))
    assert exited.value.code == 0 and "COMMAND" in shown.getvalue()


def test_dockerfile_installs_the_pinned_torch_of_pyproject() -> None:
    """torch and torchvision are installed at exactly pyproject.toml's pins, from the TORCH_INDEX wheel index."""
    pins = pyproject_pins()
    runs = " ".join(instructions("RUN"))
    for package in PINNED_PACKAGES:
        assert re.findall(rf"(?<![\w-]){package}==(\S+)", runs) == [pins[package]], package
    assert '--index-url "${TORCH_INDEX}"' in runs
    (default_index,) = [arg.split("=", 1)[1] for arg in instructions("ARG") if arg.startswith("TORCH_INDEX=")]
    assert default_index.startswith("https://download.pytorch.org/whl/")


def test_dockerfile_copies_what_the_install_and_the_flower_app_need() -> None:
    """COPY sources exist; pyproject, readme, packages and configs/ are copied, in the checkout's layout, before -e ."""
    steps = dockerfile_instructions()
    install = next(i for i, (keyword, rest) in enumerate(steps) if keyword == "RUN" and "pip install -e ." in rest)
    copied: list[str] = []
    for keyword, rest in steps[:install]:
        if keyword == "COPY":
            *sources, dest = rest.split()
            assert not any(source.startswith("--") for source in sources), "no COPY --from or options expected"
            assert dest == ("./" if len(sources) > 1 else f"./{sources[0]}"), "keep the checkout's layout under /app"
            copied += sources
    assert all((REPO / source).exists() for source in copied)
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    wanted = {name for name in packages for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
              if fnmatch.fnmatch(name, pattern)}
    assert {"crosssim", "server", "client"} <= wanted
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], str(CONFIGS_DIR.relative_to(REPO)), *wanted}
    assert needed <= set(copied)
    for component in PYPROJECT["tool"]["flwr"]["app"]["components"].values():
        assert component.split(".")[0] in copied
