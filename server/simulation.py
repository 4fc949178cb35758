"""`crosssim simulate`: the whole federation in Flower's Simulation Engine, one virtual node per site."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crosssim.config import CrossSimConfig, save_config
from crosssim.data.sites import SiteError, site_labels_path
from crosssim.federated import SITE_DIRS_KEY, federated_classes
from server.app import CONFIG_FILE_KEY, OUT_KEY, RESUME_KEY
from server.store import CONFIG_NAME, FINAL_NAME

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
             verbose: bool = False, progress: Progress = print) -> Path:
    """Run every round with the sites as virtual SuperNodes; returns ``RUN/final.pt``."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    folders = [Path(d).resolve() for d in site_dirs]
    for folder in folders:
        if site_labels_path(folder) is None:
            raise SiteError(f"{folder}: a training site needs a folder with labels.csv")
    federated_classes(cfg)
    out = Path(out).resolve()
    settings = {CONFIG_FILE_KEY: str(save_config(cfg, out / CONFIG_NAME)), OUT_KEY: str(out), RESUME_KEY: resume,
                SITE_DIRS_KEY: ",".join(str(f) for f in folders)}
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
    progress(f"simulating {len(folders)} site(s) with strategy {cfg.method.strategy} for "
             f"{cfg.federation.rounds} round(s)")
    try:
        run_simulation(server_app=build_server_app(settings, progress), client_app=build_client_app(settings),
                       num_supernodes=len(folders), backend_config=backend_config(len(folders), verbose))
    finally:
        import ray  # Flower's simulation backend; stop its processes now rather than at interpreter exit

        ray.shutdown()
    final = out / FINAL_NAME
    if not final.is_file():
        raise RuntimeError(f"the simulation ended without {final} (see the errors above)")
    return final
