"""Flower ServerApp: read the run settings, start (or resume) the run, hand the rounds to CrossSimStrategy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from crosssim.boundary import CONFIG_FILE_KEY, DEFAULT_OUT, OUT_KEY, RESUME_KEY, SITE_DIRS_KEY, STYLE_BANK_EXTRA
from crosssim.config import FIELD_INDEX, ConfigError, CrossSimConfig, load_config
from crosssim.federated import federated_classes, site_dirs, wire_config
from crosssim.model import build_model
from crosssim.style import bank_from_arrays, layer_channels
from crosssim.train import seed_everything
from server.grid import PollingGrid
from server.store import RunStore
from server.strategy import RoundAborted, build_strategy

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ServerSettings:
    cfg: CrossSimConfig
    out: Path
    resume: bool
    num_sites: int  # sites to wait for before each round


def server_settings(run_settings: Mapping[str, Any]) -> ServerSettings:
    """configs/default.toml, then ``config-file``, then every config key the run config sets (empty = unset)."""
    overrides = {k: v for k, v in run_settings.items() if k in FIELD_INDEX and v != ""}
    cfg = load_config(str(run_settings.get(CONFIG_FILE_KEY) or "") or None, overrides)
    if cfg.federation.rounds < 1:
        raise ConfigError("config key 'rounds': a federated run needs at least 1 round")
    resume = run_settings.get(RESUME_KEY, False)
    resume = resume.lower() == "true" if isinstance(resume, str) else bool(resume)
    return ServerSettings(cfg, Path(str(run_settings.get(OUT_KEY) or DEFAULT_OUT)), resume,
                          len(site_dirs(run_settings.get(SITE_DIRS_KEY))) or cfg.federation.min_sites)


def run_federation(grid: Grid, settings: ServerSettings, progress: Progress = print) -> Path | None:
    """All rounds (the remaining ones when resuming); the path of ``final.pt``, or None when a round could not
    gather min-sites replies (one line says so; ``latest.pt`` holds the last complete round)."""
    cfg, store = settings.cfg, RunStore(settings.out)
    classes = federated_classes(cfg)
    start = store.resume_point() if settings.resume else None
    if settings.resume and start is None:
        progress(f"nothing to resume in {store.out} (no {store.latest_path.name}): starting at round 1")
    if start is None:
        store.start_fresh()
        seed_everything(cfg.seed)
        state = build_model(cfg.model, len(classes)).state_dict()
        done, prototypes, style_bank = 0, None, {}
    else:
        state, done = start.state_dict, start.round
        prototypes = start.prototypes if bool(start.prototypes.present.any()) else None
        style_bank = bank_from_arrays(start.extra.get(STYLE_BANK_EXTRA, {}),
                                      layer_channels(build_model(cfg.model, len(classes)), cfg.method.style_layers))
        progress(f"resuming {store.out} after round {done}")
    store.save_config(cfg)
    strategy = build_strategy(cfg, classes, state, store, num_sites=settings.num_sites, round_offset=done,
                              prototypes=prototypes, style_bank=style_bank, progress=progress)
    remaining = cfg.federation.rounds - done
    if remaining > 0:
        progress(f"{cfg.method.strategy}: rounds {done + 1}-{cfg.federation.rounds}, classes {', '.join(classes)}, "
                 f"waiting for {settings.num_sites} site(s); writing to {store.out}")
        try:
            strategy.start(grid=grid, initial_arrays=ArrayRecord(state), num_rounds=remaining,
                           timeout=cfg.federation.round_timeout_s, train_config=ConfigRecord(wire_config(cfg)),
                           evaluate_config=ConfigRecord(wire_config(cfg)), evaluate_fn=strategy.finish_round)
        except RoundAborted as exc:
            progress(str(exc))
            return None
    final = strategy.last_checkpoint or start
    path = store.save_final(final)
    progress(f"final checkpoint: {path}")
    return path


def build_server_app(settings: Mapping[str, Any] | None = None, progress: Progress = print) -> ServerApp:
    """A ServerApp; ``settings`` stand in for run-config values (``run_simulation`` passes none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = server_settings({**context.run_config, **(settings or {})})
        run_federation(PollingGrid(grid, run.cfg.federation.reply_poll_s), run, progress)

    return app


app = build_server_app()
