"""`crosssim train`: pooled training over labeled sites (the centralized bound; one site = local-only)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from crosssim.adapt import adabn
from crosssim.checkpoint import Checkpoint, SourceStats, save_checkpoint
from crosssim.config import CrossSimConfig, save_config
from crosssim.data.sites import SiteData, load_site, union_of_labels, with_site_classes
from crosssim.fileio import atomic_write_text
from crosssim.model import build_model
from crosssim.prototypes import Prototypes, compute_prototypes
from crosssim.shift import site_averaged_figures
from crosssim.train import (configure_threads, infer, lambda_for_step, resolve_device, seed_everything,
                            train_local)

Progress = Callable[[str], None] | None


def load_labeled_sites(site_dirs: Sequence[str | Path], cfg: CrossSimConfig, cache_dir: str | Path | None,
                       progress: Progress = None) -> list[SiteData]:
    classes = tuple(cfg.data.classes) or union_of_labels(site_dirs)
    sites = []
    for folder in site_dirs:
        site = load_site(folder, cfg.data, labeled=True, classes=classes, cache_dir=cache_dir, progress=progress)
        if progress:
            progress(site.report.summary())
            for line in site.report.skipped_lines():
                progress(line)
        sites.append(site)
    return sites


def split_sites(sites: Sequence[SiteData], cfg: CrossSimConfig):
    """Concatenate per-site stratified splits: (train images, train labels, val images, val labels)."""
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for i, site in enumerate(sites):
        train_idx, val_idx = site.split(cfg.data.val_fraction, cfg.seed + i)
        for bucket, tensor in zip(parts, (site.images[train_idx], site.labels[train_idx],
                                          site.images[val_idx], site.labels[val_idx])):
            bucket.append(tensor)
    return tuple(torch.cat(bucket) for bucket in parts)


def prototypes_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  min_count: int, device: torch.device) -> Prototypes:
    _, embeddings = infer(model, images, device)
    return compute_prototypes(embeddings, labels, num_classes, min_count)


def train_pooled(site_dirs: Sequence[str | Path], cfg: CrossSimConfig, out_dir: str | Path, *,
                 cache_dir: str | Path | None = None, progress: Progress = print) -> Path:
    """Train on the union of ``site_dirs``; write ``final.pt``, ``config.toml`` and reports to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = with_site_classes(cfg, site_dirs, progress)
    save_config(cfg, out_dir / "config.toml")
    seed_everything(cfg.seed)
    configure_threads(cfg.train)
    device = resolve_device(cfg.train.device)
    sites = load_labeled_sites(site_dirs, cfg, cache_dir, progress)
    classes = sites[0].classes
    train_x, train_y, val_x, val_y = split_sites(sites, cfg)
    if progress:
        progress(f"pooled training on {len(train_y)} images ({len(val_y)} held out) from {len(sites)} site(s), "
                 f"device {device}, backbone {cfg.model.backbone}, strategy {cfg.method.strategy}")
    model = build_model(cfg.model, len(classes))
    uses_similarity = cfg.method.strategy == "crosssim" and cfg.method.lambda_sim > 0

    def refresh(epoch: int) -> tuple[Prototypes, float] | None:
        if not uses_similarity:
            return None
        protos = prototypes_of(model, train_x, train_y, len(classes), cfg.method.min_count, device)
        return protos, lambda_for_step(cfg.method.lambda_sim, epoch + 1, cfg.method.lambda_warmup)

    result = train_local(model, train_x, train_y, cfg, epochs=cfg.train.epochs, lr=cfg.train.lr,
                         seed=cfg.seed, device=device, epoch_end=refresh, progress=progress)
    adabn(model, train_x, device)  # running statistics of the final weights, as federated sites do
    reference_x, reference_y = (val_x, val_y) if len(val_y) else (train_x, train_y)
    probs, _ = infer(model, reference_x, device)
    protos = prototypes_of(model, train_x, train_y, len(classes), cfg.method.min_count, device)
    part = 1 if len(val_y) else 0  # each site's share of reference_x: its validation split, else its training split
    per_site = [site.images[site.split(cfg.data.val_fraction, cfg.seed + i)[part]] for i, site in enumerate(sites)]
    source = SourceStats.from_predictions(probs, reference_y, train_y, len(classes),
                                          site_averaged_figures(model, per_site, protos, device))
    class_counts = {c: sum(site.report.class_counts.get(c, 0) for site in sites) for c in classes}
    ckpt = Checkpoint(model.state_dict(), cfg, list(classes), protos, source, kind="pooled",
                      extra={"sites": [s.name for s in sites], "class_counts": class_counts})
    path = save_checkpoint(ckpt, out_dir / "final.pt")
    atomic_write_text(out_dir / "data_report.json",
                      json.dumps([s.report.to_dict() for s in sites], indent=2))
    atomic_write_text(out_dir / "train_metrics.json", json.dumps(
        {**asdict(result), "source_val_accuracy": source.accuracy}, indent=2))
    if progress:
        progress(f"trained {cfg.train.epochs} epochs in {result.seconds:.1f}s "
                 f"({result.examples_per_second:.0f} img/s); source validation accuracy "
                 f"{source.accuracy:.3f}; checkpoint {path}")
    return path
