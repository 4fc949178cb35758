"""What a hospital does for one Flower message: unpack records, call crosssim.federated, pack the reply."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from crosssim.boundary import (ARRAYS_RECORD, BATCHNORM_STATE_RECORD, COMPUTE_DONE, COMPUTE_SECONDS, CONFIG_RECORD,
                               DATA_LOADED, EVALUATION_RECORD, LOAD_SECONDS, METRICS_RECORD, MODEL_BUILT,
                               NODE_CACHE_KEY, NODE_DATA_KEY, NODE_SITE_KEY, NODE_UNLABELED_KEY, PARTITION_ID_KEY,
                               PROTOTYPES_RECORD, ROUND_EVALUATE, ROUND_LAMBDA, ROUND_LR, SERVER_ROUND, SITE_DIRS_KEY,
                               STYLE_BANK_RECORD, STYLE_RECORD, TARGET_DIR_KEY, TARGET_IMAGES, TIMINGS_RECORD)
from crosssim.config import CrossSimConfig
from crosssim.data.sites import SiteError, load_site
from crosssim.federated import (LocalSite, config_from_wire, evaluate_round, federated_classes, local_state_keys,
                                merge_state, prototypes_from_arrays, prototypes_to_arrays, sendable_state, site_dirs,
                                split_state, style_of, train_metrics, train_round)
from crosssim.method import uses_style_bank
from crosssim.model import CrossSimNet, build_model
from crosssim.prototypes import Prototypes
from crosssim.style import StyleEntry, bank_from_arrays, layer_channels
from crosssim.train import configure_threads, resolve_device
from crosssim.wire import from_wire, to_wire


@dataclass(frozen=True)
class SiteLocation:
    """Where this node's images and tensor cache are, and whether it is an unlabeled target in the loop."""

    folder: Path
    name: str
    cache_dir: str | None  # None: the config's cache-dir (simulation); "": this machine's default
    unlabeled: bool = False


def _flag(value: Any) -> bool:
    return value.lower() == "true" if isinstance(value, str) else bool(value)


def locate_site(context: Context, run_settings: Mapping[str, Any]) -> SiteLocation:
    """This node's site: from its node config (deployment) or ``site-dirs`` + partition id (simulation).

    In simulation the partition after the last source is the unlabeled target of ``target-dir``, if set.
    """
    node = context.node_config
    if node.get(NODE_DATA_KEY):
        folder = Path(str(node[NODE_DATA_KEY]))
        return SiteLocation(folder, str(node.get(NODE_SITE_KEY) or folder.name), str(node.get(NODE_CACHE_KEY, "")),
                            _flag(node.get(NODE_UNLABELED_KEY, False)))
    dirs = site_dirs(run_settings.get(SITE_DIRS_KEY))
    if PARTITION_ID_KEY not in node or not dirs:
        raise ValueError(f"this node has no site: start it with --node-config '{NODE_DATA_KEY}=\"DIR\"' "
                         f"(deployment) or set run config '{SITE_DIRS_KEY}' (simulation)")
    index = int(node[PARTITION_ID_KEY])
    target = str(run_settings.get(TARGET_DIR_KEY) or "")
    if index == len(dirs) and target:
        return SiteLocation(Path(target), Path(target).name, None, unlabeled=True)
    if index >= len(dirs):
        raise ValueError(f"partition {index} has no folder in '{SITE_DIRS_KEY}' ({len(dirs)} given)")
    folder = Path(dirs[index])
    return SiteLocation(folder, folder.name, None)


def _config(content: RecordDict, location: SiteLocation) -> CrossSimConfig:
    cfg = config_from_wire(dict(content[CONFIG_RECORD]), location.cache_dir)
    configure_threads(cfg.train)
    return cfg


def _global_model(content: RecordDict, context: Context, cfg: CrossSimConfig) -> tuple[CrossSimNet, set[str]]:
    """The model holding the global weights (with this site's own BatchNorm layers under FedBN)."""
    model = build_model(cfg.model, len(federated_classes(cfg)))
    local_keys = local_state_keys(model, cfg.method.strategy)
    state = from_wire(content[ARRAYS_RECORD].to_torch_state_dict(), model.state_dict())
    if local_keys and BATCHNORM_STATE_RECORD in context.state:
        state = merge_state(state, context.state[BATCHNORM_STATE_RECORD].to_torch_state_dict())
    model.load_state_dict(state)
    return model, local_keys


def _setup(content: RecordDict, context: Context, location: SiteLocation,
           timings: dict[str, float]) -> tuple[CrossSimConfig, LocalSite, CrossSimNet, set[str]]:
    """Config from the server, this site's labeled data, and the global model; their instants into ``timings``."""
    if location.unlabeled:
        raise SiteError(f"{location.folder}: an unlabeled target in the loop only sends its style; it never "
                        "trains or evaluates")
    cfg = _config(content, location)
    site = LocalSite.from_site(load_site(location.folder, cfg.data, labeled=True, classes=federated_classes(cfg),
                                         name=location.name, cache_dir=cfg.data.cache_dir or None), cfg)
    timings[DATA_LOADED] = time.time()
    model, local_keys = _global_model(content, context, cfg)
    timings[MODEL_BUILT] = time.time()
    return cfg, site, model, local_keys


def _global_prototypes(content: RecordDict, model: CrossSimNet) -> Prototypes | None:
    if PROTOTYPES_RECORD not in content:
        return None
    arrays = content[PROTOTYPES_RECORD].to_torch_state_dict()
    return prototypes_from_arrays(arrays, model.num_classes, model.embedding_dim)


def _other_styles(content: RecordDict, context: Context, model: CrossSimNet, cfg: CrossSimConfig) -> list[StyleEntry]:
    """The bank's entries of every node but this one."""
    if STYLE_BANK_RECORD not in content:
        return []
    bank = bank_from_arrays(content[STYLE_BANK_RECORD].to_torch_state_dict(),
                            layer_channels(model, cfg.method.style_layers))
    return [entry for node, entry in bank.items() if node != str(context.node_id)]


def train(content: RecordDict, context: Context, run_settings: Mapping[str, Any]) -> RecordDict:
    """Local training on the global model; reply weights (no FedBN layers; floats in update-dtype), prototypes,
    the style entry (style bank on) and scalar metrics. An unlabeled target in the loop sends its style only.

    With ``round-evaluate`` set (round-style one-message) the global model received is first evaluated as
    ``evaluate`` would, and those metrics travel in the evaluation record of the same reply.
    """
    location = locate_site(context, run_settings)
    timings: dict[str, float] = {}
    if location.unlabeled:
        return target_style(content, context, location, timings)
    cfg, site, model, local_keys = _setup(content, context, location, timings)
    device = resolve_device(cfg.train.device)
    config = content[CONFIG_RECORD]
    prototypes = _global_prototypes(content, model)
    records: dict[str, ArrayRecord | MetricRecord] = {}
    if bool(config.get(ROUND_EVALUATE, False)):
        records[EVALUATION_RECORD] = MetricRecord(evaluate_round(model, site, cfg, prototypes, device))
    style = style_of(model, site.train_x, cfg, device) if uses_style_bank(cfg) else None
    result, protos, compute_seconds = train_round(
        model, site, cfg, server_round=int(config[SERVER_ROUND]), lr=float(config[ROUND_LR]),
        lambda_sim=float(config[ROUND_LAMBDA]), prototypes=prototypes,
        device=device, styles=_other_styles(content, context, model, cfg))
    timings[COMPUTE_DONE] = time.time()
    model.cpu()
    if local_keys:
        _, local = split_state(model.state_dict(), local_keys)
        context.state[BATCHNORM_STATE_RECORD] = ArrayRecord({k: v.detach().clone() for k, v in local.items()})
    records.update({
        ARRAYS_RECORD: ArrayRecord(to_wire(sendable_state(model, local_keys), cfg.federation.update_dtype)),
        PROTOTYPES_RECORD: ArrayRecord(prototypes_to_arrays(protos)),
        METRICS_RECORD: MetricRecord(train_metrics(result, site, cfg, compute_seconds)),
        TIMINGS_RECORD: MetricRecord(timings),
    })
    if style is not None:
        records[STYLE_RECORD] = ArrayRecord(style.to_arrays())
    return RecordDict(records)


def target_style(content: RecordDict, context: Context, location: SiteLocation,
                 timings: dict[str, float]) -> RecordDict:
    """An unlabeled target in the loop: its style entry under the global model and its image count, nothing else."""
    started = time.perf_counter()
    cfg = _config(content, location)
    site = load_site(location.folder, cfg.data, labeled=False, classes=federated_classes(cfg), name=location.name,
                     cache_dir=cfg.data.cache_dir or None)
    timings[DATA_LOADED] = time.time()
    model, _ = _global_model(content, context, cfg)
    timings[MODEL_BUILT] = time.time()
    style = style_of(model, site.images, cfg, resolve_device(cfg.train.device))
    timings[COMPUTE_DONE] = time.time()
    metrics = {TARGET_IMAGES: style.count, COMPUTE_SECONDS: time.perf_counter() - started,
               LOAD_SECONDS: site.report.load_seconds}
    return RecordDict({STYLE_RECORD: ArrayRecord(style.to_arrays()), METRICS_RECORD: MetricRecord(metrics),
                       TIMINGS_RECORD: MetricRecord(timings)})


def evaluate(content: RecordDict, context: Context, run_settings: Mapping[str, Any]) -> RecordDict:
    """Validation summaries of the global model (with this site's BN under FedBN); never per-image data."""
    timings: dict[str, float] = {}
    cfg, site, model, _ = _setup(content, context, locate_site(context, run_settings), timings)
    metrics = evaluate_round(model, site, cfg, _global_prototypes(content, model), resolve_device(cfg.train.device))
    timings[COMPUTE_DONE] = time.time()
    return RecordDict({METRICS_RECORD: MetricRecord(metrics), TIMINGS_RECORD: MetricRecord(timings)})


HANDLERS = {"train": train, "evaluate": evaluate}  # by message type (client.app, client.site_worker)
