"""A federated run's folder: effective config, one RoundRecord per line, atomic checkpoints per round."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crosssim.boundary import (FINAL_NAME, LATEST_NAME, ROUND_CHECKPOINT_GLOB, ROUNDS_LOG_NAME, RUN_CONFIG_NAME,
                               round_checkpoint_name)
from crosssim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from crosssim.config import CrossSimConfig, save_config


@dataclass
class RoundRecord:
    """One line of ``rounds.jsonl``; the strategy fills it as Flower's round proceeds."""

    round: int
    lr: float
    lambda_sim: float  # written as "lambda"
    sites: int = 0  # train replies aggregated
    failures: list[str] = field(default_factory=list)  # train replies that failed or never came: "node N: reason"
    retries: int = 0  # times the round's train messages were sent again (fewer than min-sites replies)
    rejected: list[str] = field(default_factory=list)  # replies refused by server.reply_check: "node N: rejected: why"
    examples: int = 0
    train: dict[str, float] = field(default_factory=dict)  # Flower's weighted average of the scalar metrics
    train_compute_s: list[float] = field(default_factory=list)  # per site
    load_s: list[float] = field(default_factory=list)  # per site
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # "node N" → images per class (small as 0)
    target_images: int = 0  # images behind the style entries of unlabeled targets in the loop
    train_s: float = 0.0
    evaluate: dict[str, float] = field(default_factory=dict)
    evaluate_failures: list[str] = field(default_factory=list)
    evaluate_compute_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    checkpoint: str = ""
    timeline: dict[str, float] = field(default_factory=dict)  # server instants (s since the epoch): "train-sent" …
    site_timings: dict[str, dict[str, float]] = field(default_factory=dict)  # "train node N" → crosssim.boundary's
    # TIMING_EVENTS at that site; with one-message a round's train messages also evaluated the previous round's model

    def to_json(self) -> str:
        doc: dict[str, Any] = dataclasses.asdict(self)
        doc["lambda"] = doc.pop("lambda_sim")
        return json.dumps(doc)


class RunStore:
    """``RUN/config.toml``, ``RUN/rounds.jsonl``, ``RUN/round-NNNN.pt``, ``RUN/latest.pt``, ``RUN/final.pt``."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)

    @property
    def config_path(self) -> Path:
        return self.out / RUN_CONFIG_NAME

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
        return self.out / round_checkpoint_name(server_round)

    def start_fresh(self) -> None:
        """Forget an earlier run's rounds in this folder (only the files this store writes)."""
        for path in [*self.out.glob(ROUND_CHECKPOINT_GLOB), self.latest_path, self.final_path, self.rounds_log]:
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
        """The run's effective config: this is its one writer."""
        return save_config(cfg, self.config_path)

    def save_round(self, ckpt: Checkpoint) -> Path:
        """``round-NNNN.pt`` then ``latest.pt``, each written atomically."""
        path = save_checkpoint(ckpt, self.round_path(ckpt.round))
        save_checkpoint(ckpt, self.latest_path)
        return path

    def save_final(self, ckpt: Checkpoint) -> Path:
        return save_checkpoint(ckpt, self.final_path)

    def log_round(self, record: RoundRecord) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.rounds_log, "a") as handle:
            handle.write(record.to_json() + "\n")
