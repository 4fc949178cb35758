"""A federated run's folder: effective config, one JSON line per round, atomic checkpoints per round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crosssim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from crosssim.config import CrossSimConfig, save_config

CONFIG_NAME = "config.toml"
ROUNDS_LOG_NAME = "rounds.jsonl"
LATEST_NAME = "latest.pt"
FINAL_NAME = "final.pt"
ROUND_PATTERN = "round-*.pt"


class RunStore:
    """``RUN/config.toml``, ``RUN/rounds.jsonl``, ``RUN/round-NNNN.pt``, ``RUN/latest.pt``, ``RUN/final.pt``."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)

    @property
    def config_path(self) -> Path:
        return self.out / CONFIG_NAME

    @property
    def rounds_log(self) -> Path:
        return self.out / ROUNDS_LOG_NAME

    @property
    def latest_path(self) -> Path:
        return self.out / LATEST_NAME

    @property
    def final_path(self) -> Path:
        return self.out / FINAL_NAME

    def round_path(self, server_round: int) -> Path:
        return self.out / f"round-{server_round:04d}.pt"

    def start_fresh(self) -> None:
        """Forget an earlier run's rounds in this folder (only the files this store writes)."""
        for path in [*self.out.glob(ROUND_PATTERN), self.latest_path, self.final_path, self.rounds_log]:
            path.unlink(missing_ok=True)

    def resume_point(self) -> Checkpoint | None:
        """The last completed round (``latest.pt``), with the round log cut back to it; None if none."""
        if not self.latest_path.is_file():
            return None
        ckpt = load_checkpoint(self.latest_path)
        if self.rounds_log.is_file():
            kept = [line for line in self.rounds_log.read_text().splitlines()
                    if line.strip() and json.loads(line)["round"] <= ckpt.round]
            self.rounds_log.write_text("".join(f"{line}\n" for line in kept))
        return ckpt

    def save_config(self, cfg: CrossSimConfig) -> Path:
        return save_config(cfg, self.config_path)

    def save_round(self, ckpt: Checkpoint) -> Path:
        """``round-NNNN.pt`` then ``latest.pt``, each written atomically."""
        path = save_checkpoint(ckpt, self.round_path(ckpt.round))
        save_checkpoint(ckpt, self.latest_path)
        return path

    def save_final(self, ckpt: Checkpoint) -> Path:
        return save_checkpoint(ckpt, self.final_path)

    def log_round(self, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.rounds_log, "a") as handle:
            handle.write(json.dumps(record) + "\n")
