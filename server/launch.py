r"""`crosssim server`: a Flower SuperLink plus `flwr run` of this app, streamed until the run ends.

Raw Flower equivalent (printed by ``--dry-run``)::

    flower-superlink --insecure --host H --port P --database RUN/.flwr/superlink.db \
        --disable-runtime-dependency-installation
    FLWR_HOME=RUN/.flwr flwr run APP_ROOT crosssim --stream --run-config 'seed=0 … out="RUN" resume=false'

The SuperLink keeps its state (connected SuperNodes, registered keys) in ``RUN/.flwr/superlink.db``, so after
a crash ``crosssim server --resume`` finds the hospitals' SuperNodes still known and they reconnect by themselves;
a fresh run (no ``--resume``) starts that state empty. With ``--auth-keys DIR`` the SuperLink runs with
``--enable-supernode-auth`` and, before ``flwr run``, each ``DIR/*.pub`` is registered with
``flwr supernode register KEY crosssim --name NAME``.

The whole effective config travels as run-config values (every key is declared in pyproject's
``[tool.flwr.app.config]``); the ServerApp writes it to ``RUN/config.toml``.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from crosssim.boundary import FLWR_HOME_DIRNAME, OUT_KEY, RESUME_KEY, SUPERLINK_LOG_NAME, final_checkpoint
from crosssim.certs import chosen_tls_files, public_keys_in
from crosssim.config import CrossSimConfig, to_run_config
from crosssim.processes import (
    Children,
    LaunchError,
    describe_command,
    flower_env,
    key_values,
    local_address,
    require_free_port,
    require_pem,
    stop_on_sigterm,
    toml_string,
    wait_for_port,
)

DEFAULT_HOST = "127.0.0.1"  # loopback only; 0.0.0.0 accepts hospitals on other machines
DEFAULT_SUPERLINK_PORT = 8000  # Flower's default: one HTTP port for the Fleet, Control and Runtime APIs
SUPERLINK_START_TIMEOUT_S = 60.0
CONNECTION_NAME = "crosssim"  # the SuperLink connection `flwr run` uses, in RUN/.flwr/config.toml
FLWR_CONFIG_NAME = "config.toml"  # inside FLWR_HOME
SUPERLINK_DATABASE_NAME = "superlink.db"  # inside FLWR_HOME: the SuperLink's state, kept for --resume
ALREADY_REGISTERED = "already in use"  # Flower's reason when a key is registered in the kept state


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address the SuperLink binds (default {DEFAULT_HOST}; 0.0.0.0 for remote hospitals)")
    parser.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT,
                        help=f"SuperLink port for hospitals and `flwr` (default {DEFAULT_SUPERLINK_PORT})")
    parser.add_argument("--min-sites", type=int, metavar="K", help="hospitals to wait for before each round "
                        "(overrides the config's min-sites)")
    parser.add_argument("--classes", metavar="A,B,...", help="the class names every hospital's labels.csv uses "
                        "(required unless the config sets 'classes'; sites never share their labels beforehand)")
    parser.add_argument("--run-config", metavar="'KEY=VALUE ...'",
                        help="extra overrides passed as they are to `flwr run --run-config` (TOML values), "
                             "after the config's own; e.g. 'lambda-sim=0.25 rounds=5'")
    parser.add_argument("--app", metavar="DIR", help="Flower app root (default: this CrossSim checkout)")
    security = parser.add_argument_group("transport security")
    security.add_argument("--insecure", action="store_true", default=True,
                          help="plain HTTP (the default until TLS certificates are given)")
    security.add_argument("--tls-dir", metavar="DIR", help="TLS with the ca.pem, server.pem and server.key that "
                          "`crosssim certs DIR --host NAME` wrote (hospitals then pass --root-certificates DIR/ca.pem)")
    security.add_argument("--ssl-ca-certfile", metavar="FILE", help="CA certificate (enables TLS with the two below)")
    security.add_argument("--ssl-certfile", metavar="FILE", help="SuperLink certificate (its SAN must cover --host)")
    security.add_argument("--ssl-keyfile", metavar="FILE", help="SuperLink private key")
    security.add_argument("--auth-keys", metavar="DIR", help="admit registered hospitals only: register every "
                          "DIR/*.pub (from `crosssim certs DIR --sites A,B`: DIR/auth-keys) before the run; a "
                          "SuperNode without a registered key is refused (needs TLS)")
    parser.add_argument("--dry-run", action="store_true", help="print the raw Flower commands and exit")


def default_app_root() -> Path:
    """The checkout holding pyproject.toml with [tool.flwr.app] (CrossSim is installed editable)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise LaunchError(f"no Flower app found at {root}; pass --app DIR (the CrossSim source checkout)")
    return root


def _tls_files(args: argparse.Namespace) -> list[str] | None:
    """CA, SuperLink certificate and key (from --tls-dir or the three --ssl-* files), or None for plain HTTP."""
    return chosen_tls_files(args.tls_dir, {"--ssl-ca-certfile": args.ssl_ca_certfile,
                                           "--ssl-certfile": args.ssl_certfile, "--ssl-keyfile": args.ssl_keyfile},
                            lambda tls: (tls.ca, tls.server_cert, tls.server_key))


def check_tls_files(args: argparse.Namespace) -> None:
    """Each given certificate and key exists and is PEM, before anything starts."""
    tls = _tls_files(args)
    if tls is not None:
        require_pem(tls[0], "certificate", "--ssl-ca-certfile")
        require_pem(tls[1], "certificate", "--ssl-certfile")
        require_pem(tls[2], "private key", "--ssl-keyfile")


def superlink_command(args: argparse.Namespace, database: Path) -> list[str]:
    tls = _tls_files(args)
    security = ["--insecure"] if tls is None else \
        ["--ssl-ca-certfile", tls[0], "--ssl-certfile", tls[1], "--ssl-keyfile", tls[2]]
    if args.auth_keys:
        if tls is None:
            raise LaunchError("--auth-keys needs TLS: pass --tls-dir (Flower authenticates SuperNodes over TLS only)")
        security.append("--enable-supernode-auth")
    # Without this flag the SuperLink would `uv sync` the app's dependencies (i.e. download torch).
    return ["flower-superlink", *security, "--host", args.host, "--port", str(args.port),
            "--database", str(database), "--disable-runtime-dependency-installation"]


def flwr_config_text(args: argparse.Namespace) -> str:
    """``$FLWR_HOME/config.toml`` naming the SuperLink connection `flwr run` submits to."""
    tls = _tls_files(args)
    security = "insecure = true" if tls is None else f"root-certificates = {toml_string(str(Path(tls[0]).resolve()))}"
    address = f"{local_address(args.host)}:{args.port}"
    return (f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n[superlink.{CONNECTION_NAME}]\n'
            f'address = "{address}"\n{security}\n')


def register_commands(args: argparse.Namespace) -> list[list[str]]:
    """One ``flwr supernode register`` per public key of ``--auth-keys`` (named after its file)."""
    if not args.auth_keys:
        return []
    try:
        keys = public_keys_in(args.auth_keys)
    except ValueError as exc:
        raise LaunchError(str(exc)) from None
    return [["flwr", "supernode", "register", str(key.resolve()), CONNECTION_NAME, "--name", key.stem]
            for key in keys]


def register_hospitals(commands: list[list[str]], env: dict[str, str]) -> None:
    """Run each registration; the first one Flower refuses is a ``LaunchError`` with Flower's reason."""
    for command in commands:
        result = subprocess.run(command, env=flower_env(env), capture_output=True, text=True)
        if result.returncode != 0 and ALREADY_REGISTERED not in result.stdout + result.stderr:
            raise LaunchError(f"{command[3]}: Flower did not register this key ({_flower_reason(result)})")
    if commands:
        print(f"registered {len(commands)} hospital key(s): {', '.join(c[-1] for c in commands)}; only they may "
              f"join", flush=True)


def _flower_reason(result: subprocess.CompletedProcess) -> str:
    """The text inside the box Flower's CLI draws around an error, on one line."""
    text = " ".join(line.strip(" │╭╮╰╯─") for line in (result.stdout + result.stderr).splitlines())
    return " ".join(text.split()) or f"exit code {result.returncode}"


def run_command(cfg: CrossSimConfig, args: argparse.Namespace, app_root: Path, out: Path) -> list[str]:
    """`flwr run` with the effective config, the run folder and resume as run-config values."""
    values = {**to_run_config(cfg), OUT_KEY: str(out), RESUME_KEY: bool(args.resume)}
    command = ["flwr", "run", str(app_root), CONNECTION_NAME, "--stream", "--run-config", key_values(values)]
    return command + (["--run-config", args.run_config] if args.run_config else [])


def require_classes(cfg: CrossSimConfig) -> None:
    if not cfg.data.classes:
        raise LaunchError("no classes: pass --classes A,B (the labels every hospital's labels.csv uses) or set "
                          "'classes' in the config; the server never sees the sites' labels, so it cannot take "
                          "their union")


def serve(cfg: CrossSimConfig, args: argparse.Namespace) -> int:
    """Start the SuperLink, submit the run, stream it, stop everything; 0 when final.pt was written."""
    require_classes(cfg)
    out = Path(args.out).resolve()
    flwr_home = out / FLWR_HOME_DIRNAME
    app_root = Path(args.app).resolve() if args.app else default_app_root()
    database = flwr_home / SUPERLINK_DATABASE_NAME
    superlink, flwr_run = superlink_command(args, database), run_command(cfg, args, app_root, out)
    registrations = register_commands(args)
    env = {"FLWR_HOME": str(flwr_home)}
    if args.dry_run:
        print(f"# {flwr_home / FLWR_CONFIG_NAME}\n{flwr_config_text(args)}")
        for command in [superlink, *registrations, flwr_run]:
            print(describe_command(command, env))
        return 0
    check_tls_files(args)
    require_free_port(args.host, args.port, "--port")
    started = time.time()
    flwr_home.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        for state in flwr_home.glob(f"{SUPERLINK_DATABASE_NAME}*"):  # with SQLite's -wal and -shm files
            state.unlink()  # a fresh run knows no SuperNode of an earlier one
    (flwr_home / FLWR_CONFIG_NAME).write_text(flwr_config_text(args))
    stop_on_sigterm()
    children = Children()
    try:
        with open(out / SUPERLINK_LOG_NAME, "a") as log:
            link = children.start(superlink, flower_env(env), log)
            wait_for_port(local_address(args.host), args.port, SUPERLINK_START_TIMEOUT_S, link, "flower-superlink")
            register_hospitals(registrations, env)
            print(f"SuperLink listening on {args.host}:{args.port} (log: {out / SUPERLINK_LOG_NAME}); hospitals join "
                  f"with: crosssim client --superlink HOST:{args.port} --data DIR --site NAME", flush=True)
            print(f"waiting for {cfg.federation.min_sites} site(s), then {cfg.federation.rounds} round(s) of "
                  f"{cfg.method.strategy} over classes {', '.join(cfg.data.classes)}", flush=True)
            code = children.start(flwr_run, flower_env(env)).wait()
    finally:
        children.stop_all()
    final = final_checkpoint(out)
    if code != 0 or not final.is_file() or final.stat().st_mtime < started:
        print(f"crosssim server: the run did not finish (flwr run exit code {code}; see the log above and "
              f"{out / SUPERLINK_LOG_NAME})")
        return 1
    print(f"done: {final}")
    return 0
