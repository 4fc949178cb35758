"""What a hospital does for one Flower message: unpack records, call crosssim.federated, pack the reply."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict

from crosssim.boundary import (ARRAYS_RECORD, BATCHNORM_STATE_RECORD, CONFIG_RECORD, METRICS_RECORD, NODE_CACHE_KEY,
                               NODE_DATA_KEY, NODE_SITE_KEY, PARTITION_ID_KEY, PROTOTYPES_RECORD, ROUND_LAMBDA,
                               ROUND_LR, SERVER_ROUND, SITE_DIRS_KEY)
from crosssim.config import CrossSimConfig
from crosssim.data.sites import load_site
from crosssim.federated import (LocalSite, config_from_wire, evaluate_round, federated_classes, from_wire,
                                local_state_keys, merge_state, prototypes_from_arrays, prototypes_to_arrays,
                                sendable_state, site_dirs, split_state, to_wire, train_metrics, train_round)
from crosssim.model import CrossSimNet, build_model
from crosssim.prototypes import Prototypes
from crosssim.train import configure_threads, resolve_device


@dataclass(frozen=True)
class SiteLocation:
    """Where this node's images and tensor cache are."""

    folder: Path
    name: str
    cache_dir: str | None  # None: the config's cache-dir (simulation); "": this machine's default


def locate_site(context: Context, run_settings: Mapping[str, Any]) -> SiteLocation:
    """This node's site: from its node config (deployment) or ``site-dirs`` + partition id (simulation)."""
    node = context.node_config
    if node.get(NODE_DATA_KEY):
        folder = Path(str(node[NODE_DATA_KEY]))
        return SiteLocation(folder, str(node.get(NODE_SITE_KEY) or folder.name), str(node.get(NODE_CACHE_KEY, "")))
    dirs = site_dirs(run_settings.get(SITE_DIRS_KEY))
    if PARTITION_ID_KEY not in node or not dirs:
        raise ValueError(f"this node has no site: start it with --node-config '{NODE_DATA_KEY}=\"DIR\"' "
                         f"(deployment) or set run config '{SITE_DIRS_KEY}' (simulation)")
    index = int(node[PARTITION_ID_KEY])
    if index >= len(dirs):
        raise ValueError(f"partition {index} has no folder in '{SITE_DIRS_KEY}' ({len(dirs)} given)")
    folder = Path(dirs[index])
    return SiteLocation(folder, folder.name, None)


def _setup(content: RecordDict, context: Context,
           run_settings: Mapping[str, Any]) -> tuple[CrossSimConfig, LocalSite, CrossSimNet, set[str]]:
    """Config from the server, this site's data, and the model holding the global weights (+ local BN)."""
    location = locate_site(context, run_settings)
    cfg = config_from_wire(dict(content[CONFIG_RECORD]), location.cache_dir)
    configure_threads(cfg.train)
    classes = federated_classes(cfg)
    site = load_site(location.folder, cfg.data, labeled=True, classes=classes, name=location.name,
                     cache_dir=cfg.data.cache_dir or None)
    model = build_model(cfg.model, len(classes))
    local_keys = local_state_keys(model, cfg.method.strategy)
    state = merge_state(model.state_dict(), from_wire(content[ARRAYS_RECORD].to_torch_state_dict()))
    if local_keys and BATCHNORM_STATE_RECORD in context.state:
        state = merge_state(state, context.state[BATCHNORM_STATE_RECORD].to_torch_state_dict())
    model.load_state_dict(state)
    return cfg, LocalSite.from_site(site, cfg), model, local_keys


def _global_prototypes(content: RecordDict, model: CrossSimNet) -> Prototypes | None:
    if PROTOTYPES_RECORD not in content:
        return None
    arrays = content[PROTOTYPES_RECORD].to_torch_state_dict()
    return prototypes_from_arrays(arrays, model.num_classes, model.embedding_dim)


def train(content: RecordDict, context: Context, run_settings: Mapping[str, Any]) -> RecordDict:
    """Local training on the global model; reply weights (no FedBN layers; floats in update-dtype), prototypes
    and scalar metrics."""
    cfg, site, model, local_keys = _setup(content, context, run_settings)
    config = content[CONFIG_RECORD]
    result, protos, compute_seconds = train_round(
        model, site, cfg, server_round=int(config[SERVER_ROUND]), lr=float(config[ROUND_LR]),
        lambda_sim=float(config[ROUND_LAMBDA]), prototypes=_global_prototypes(content, model),
        device=resolve_device(cfg.train.device))
    model.cpu()
    if local_keys:
        _, local = split_state(model.state_dict(), local_keys)
        context.state[BATCHNORM_STATE_RECORD] = ArrayRecord({k: v.detach().clone() for k, v in local.items()})
    return RecordDict({
        ARRAYS_RECORD: ArrayRecord(to_wire(sendable_state(model, local_keys), cfg.federation.update_dtype)),
        PROTOTYPES_RECORD: ArrayRecord(prototypes_to_arrays(protos)),
        METRICS_RECORD: MetricRecord(train_metrics(result, site, cfg, compute_seconds)),
    })


def evaluate(content: RecordDict, context: Context, run_settings: Mapping[str, Any]) -> RecordDict:
    """Validation summaries of the global model (with this site's BN under FedBN); never per-image data."""
    cfg, site, model, _ = _setup(content, context, run_settings)
    metrics = evaluate_round(model, site, cfg, _global_prototypes(content, model), resolve_device(cfg.train.device))
    return RecordDict({METRICS_RECORD: MetricRecord(metrics)})
