"""`crosssim simulate`: the whole federation in Flower's Simulation Engine, one virtual node per site."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crosssim.boundary import OUT_KEY, RESUME_KEY, SITE_DIRS_KEY, TARGET_DIR_KEY, final_checkpoint
from crosssim.config import ConfigError, CrossSimConfig, to_run_config
from crosssim.data.sites import SiteError, labels_file_of, with_site_classes
from crosssim.method import uses_style_bank

Progress = Callable[[str], None]


def backend_config(num_sites: int, verbose: bool) -> dict[str, Any]:
    """Ray resources: the machine's CPUs (and GPUs) shared evenly, so sites train in parallel where they fit."""
    import torch

    cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    return {
        "client_resources": {"num_cpus": max(1, cpus // num_sites), "num_gpus": gpus / num_sites if gpus else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "logging_level": "INFO" if verbose else "ERROR",
                      "log_to_driver": verbose},
    }


def simulate(site_dirs: Sequence[str | Path], cfg: CrossSimConfig, out: str | Path, *, resume: bool = False,
             target: str | Path | None = None, verbose: bool = False, progress: Progress = print) -> Path:
    """Run every round with the sites as virtual SuperNodes; returns ``RUN/final.pt``.

    ``target``: an unlabeled site folder in the loop, one more virtual node that only sends its style entry.
    """
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    folders = [Path(d).resolve() for d in site_dirs]
    for folder in folders:
        labels_file_of(folder)  # a clear error now rather than a failed reply from every round
    cfg = with_site_classes(cfg, folders, progress)
    out = Path(out).resolve()
    settings = {**to_run_config(cfg), OUT_KEY: str(out), RESUME_KEY: resume,
                SITE_DIRS_KEY: ",".join(str(f) for f in folders)}
    if target is not None:
        if not Path(target).is_dir():
            raise SiteError(f"{target}: target site folder not found")
        if not uses_style_bank(cfg):
            raise ConfigError("--target: the target contributes only its style entry, which nothing uses with "
                              "the style bank off; set strategy = crosssim and style-mix-probability > 0")
        settings[TARGET_DIR_KEY] = str(Path(target).resolve())
    num_nodes = len(folders) + (target is not None)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
    progress(f"simulating {len(folders)} site(s){' and an unlabeled target' if target is not None else ''} with "
             f"strategy {cfg.method.strategy} for {cfg.federation.rounds} round(s)")
    try:
        run_simulation(server_app=build_server_app(settings, progress), client_app=build_client_app(settings),
                       num_supernodes=num_nodes, backend_config=backend_config(num_nodes, verbose))
    finally:
        import ray  # Flower's simulation backend; stop its processes now rather than at interpreter exit

        ray.shutdown()
    final = final_checkpoint(out)
    if not final.is_file():
        raise RuntimeError(f"the simulation ended without {final} (see the errors above)")
    return final
