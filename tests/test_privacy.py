"""What leaves a hospital: the ClientApp's replies hold weights, prototypes with counts and scalars only."""

import time

import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.app import app as client_app
from crosssim.boundary import (
    BATCHNORM_STATE_RECORD,
    COMPUTE_SECONDS,
    CONFIDENCE_HISTOGRAM,
    EVALUATION_RECORD,
    LOAD_SECONDS,
    PROTOTYPE_COUNTS,
    PROTOTYPE_VECTORS,
    ROUND_EVALUATE,
    ROUND_LAMBDA,
    ROUND_LR,
    SERVER_ROUND,
    SITE_CLASS_COUNTS,
    STYLE_BANK_RECORD,
    STYLE_RECORD,
    TARGET_IMAGES,
    TIMING_EVENTS,
    TIMINGS_RECORD,
    TRAIN_CLASS_COUNTS,
)
from crosssim.config import load_config
from crosssim.data.sites import load_site
from crosssim.data.synth import CLASSES as SYNTH_CLASSES
from crosssim.data.synth import generate_hospitals
from crosssim.federated import LocalSite, prototypes_to_arrays, wire_config
from crosssim.method import uses_style_bank
from crosssim.metrics import CONFIDENCE_BINS
from crosssim.model import batchnorm_state_keys, build_model
from crosssim.prototypes import Prototypes
from crosssim.style import STYLE_COUNT, STYLE_STATS, StyleEntry, bank_to_arrays, layer_channels
from crosssim.wire import from_wire, to_wire

IMAGE_SIZE_PX = 32
MIN_COUNT = 3  # with 12 images a site, some classes fall under it
STYLE_MIX = 0.5  # the style bank on (the default is off), so every reply a site can send is checked
TINY = {"classes": ",".join(SYNTH_CLASSES), "image-size": IMAGE_SIZE_PX, "batch-size": 8, "local-epochs": 1,
        "min-count": MIN_COUNT, "augment": False}


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("privacy")
    return generate_hospitals(out / "sites", images_per_site=12, image_size=IMAGE_SIZE_PX).source_sites[0]


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return Message(content=content, metadata=metadata)


def _send(site_dir, tmp_path, strategy: str, message_type: str, prototypes: Prototypes | None = None,
          context: Context | None = None, unlabeled: bool = False, style_bank: dict | None = None,
          evaluate: bool = False):
    cfg = load_config(None, {"style-mix-probability": STYLE_MIX, **TINY, "strategy": strategy})
    torch.manual_seed(0)  # the same global model in every call
    model = build_model(cfg.model, len(cfg.data.classes))
    config = ConfigRecord({**wire_config(cfg), SERVER_ROUND: 2, ROUND_LR: cfg.train.lr, ROUND_LAMBDA: 0.5,
                           ROUND_EVALUATE: evaluate})
    records = {"arrays": ArrayRecord(to_wire(model.state_dict(), cfg.federation.update_dtype)), "config": config}
    if prototypes is not None:
        records["prototypes"] = ArrayRecord(prototypes_to_arrays(prototypes))
    if style_bank is not None:
        records[STYLE_BANK_RECORD] = ArrayRecord(bank_to_arrays(style_bank))
    node_config = {"data": str(site_dir), "site": "a", "cache": str(tmp_path / "cache"), "unlabeled": unlabeled}
    context = context or Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config=node_config)
    reply = client_app(_message(RecordDict(records), message_type), context)
    assert not reply.has_error()
    assert_only_ordered_instants(reply.content.pop(TIMINGS_RECORD))
    return cfg, model, reply.content, context


def assert_only_ordered_instants(timings) -> None:
    """A timings record: the declared wall-clock instants of this message at the site, nothing else, in order."""
    names = [name for name in TIMING_EVENTS if name in timings]
    assert set(timings) == set(names) and len(names) == len(TIMING_EVENTS)
    instants = [timings[name] for name in names]
    assert all(isinstance(t, float) for t in instants) and instants == sorted(instants)
    assert abs(instants[-1] - time.time()) < 60


def _train_split(site_dir, cfg, tmp_path) -> LocalSite:
    site = load_site(site_dir, cfg.data, labeled=True, classes=cfg.data.classes, cache_dir=tmp_path / "cache")
    return LocalSite.from_site(site, cfg)


@pytest.mark.parametrize("strategy", ["crosssim", "fedbn"])
def test_train_reply_holds_only_weights_prototypes_and_scalars(site_dir, tmp_path, strategy):
    global_protos = Prototypes(torch.nn.functional.normalize(torch.randn(4, 128), dim=1), torch.tensor([5, 5, 5, 0]))
    cfg, model, content, context = _send(site_dir, tmp_path, strategy, MessageType.TRAIN, global_protos)
    assert set(content.keys()) == {"arrays", "prototypes", "metrics"} | ({STYLE_RECORD} if uses_style_bank(cfg)
                                                                         else set())
    split = _train_split(site_dir, cfg, tmp_path)

    expected = model.state_dict()
    if strategy == "fedbn":
        for key in batchnorm_state_keys(model):
            expected.pop(key)
        assert set(context.state[BATCHNORM_STATE_RECORD].keys()) == batchnorm_state_keys(model)
    packed = content["arrays"].to_torch_state_dict()  # the declared tensors, flat (crosssim.wire): nothing more
    assert {k: v.numel() for k, v in packed.items()} == {k: v.numel() for k, v in to_wire(expected, "float32").items()}
    sent = from_wire(packed, expected)

    protos = content["prototypes"].to_torch_state_dict()
    assert set(protos) == {PROTOTYPE_VECTORS, PROTOTYPE_COUNTS}
    assert protos[PROTOTYPE_VECTORS].shape == (4, 128) and protos[PROTOTYPE_COUNTS].shape == (4,)

    style = content[STYLE_RECORD].to_torch_state_dict() if STYLE_RECORD in content else {}
    if style:
        assert_only_declared_style(style, model, cfg, expected_count=len(split.train_y))
    image_tail = (IMAGE_SIZE_PX, IMAGE_SIZE_PX)
    assert not any(tuple(v.shape[-2:]) == image_tail for v in [*sent.values(), *protos.values(), *style.values()])
    metrics = dict(content["metrics"])
    site_counts = metrics.pop(SITE_CLASS_COUNTS)  # the one list: images per class, small cells suppressed
    all_counts = torch.bincount(torch.cat([split.train_y, split.val_y]), minlength=4)
    assert site_counts == [int(c) if c >= MIN_COUNT else 0 for c in all_counts]
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    assert metrics["sim-loss"] > 0  # the global prototypes were used (λ = 0.5)


def test_class_under_min_count_sends_zero_vector_and_count(site_dir, tmp_path):
    cfg, _, content, _ = _send(site_dir, tmp_path, "crosssim", MessageType.TRAIN)
    train_counts = torch.bincount(_train_split(site_dir, cfg, tmp_path).train_y, minlength=4)
    small = train_counts < MIN_COUNT
    assert small.any() and (~small).any(), "the tiny site should have classes on both sides of min-count"
    protos = content["prototypes"].to_torch_state_dict()
    assert torch.equal(protos[PROTOTYPE_COUNTS][small], torch.zeros(int(small.sum()), dtype=torch.int64))
    assert torch.count_nonzero(protos[PROTOTYPE_VECTORS][small]) == 0
    assert torch.equal(protos[PROTOTYPE_COUNTS][~small], train_counts[~small])


@pytest.mark.parametrize("strategy", ["crosssim", "fedbn"])
def test_a_one_message_train_reply_evaluates_the_model_it_received_as_an_evaluate_message_does(site_dir, tmp_path,
                                                                                            strategy):
    global_protos = Prototypes(torch.nn.functional.normalize(torch.randn(4, 128), dim=1), torch.tensor([5, 5, 5, 0]))
    _, _, trained, context = _send(site_dir, tmp_path, strategy, MessageType.TRAIN, global_protos)  # FedBN: local BN
    _, _, evaluated, _ = _send(site_dir, tmp_path, strategy, MessageType.EVALUATE, global_protos, context)
    _, _, content, _ = _send(site_dir, tmp_path, strategy, MessageType.TRAIN, global_protos, context, evaluate=True)
    assert EVALUATION_RECORD not in trained and set(evaluated.keys()) == {"metrics"}
    assert set(content.keys()) - {STYLE_RECORD} == {"arrays", "prototypes", "metrics", EVALUATION_RECORD}
    timing = {COMPUTE_SECONDS, LOAD_SECONDS}
    in_train, alone = dict(content[EVALUATION_RECORD]), dict(evaluated["metrics"])
    assert {k: v for k, v in in_train.items() if k not in timing} == {k: v for k, v in alone.items() if k not in timing}
    assert set(in_train) == set(alone) and len(in_train[CONFIDENCE_HISTOGRAM]) == CONFIDENCE_BINS


def test_evaluate_reply_holds_scalars_and_fixed_length_summaries(site_dir, tmp_path):
    cfg, _, content, _ = _send(site_dir, tmp_path, "crosssim", MessageType.EVALUATE)
    assert set(content.keys()) == {"metrics"}
    metrics = dict(content["metrics"])
    histogram = metrics.pop(CONFIDENCE_HISTOGRAM)
    class_counts = metrics.pop(TRAIN_CLASS_COUNTS)
    assert len(histogram) == CONFIDENCE_BINS and abs(sum(histogram) - 1.0) < 1e-6
    train_counts = torch.bincount(_train_split(site_dir, cfg, tmp_path).train_y, minlength=4)
    assert class_counts == [int(c) if c >= MIN_COUNT else 0 for c in train_counts]  # small cells suppressed
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())


def assert_only_declared_style(style: dict, model, cfg, expected_count: int) -> None:
    """A style record: exactly 4 per-channel statistics per style layer and one count; nothing per image."""
    shapes = layer_channels(model, cfg.method.style_layers)
    assert set(style) == {f"{layer}/{stat}" for layer in shapes for stat in STYLE_STATS} | {STYLE_COUNT}
    assert all(tuple(style[f"{layer}/{stat}"].shape) == (channels,)
               for layer, channels in shapes.items() for stat in STYLE_STATS)
    assert style[STYLE_COUNT].tolist() == [expected_count]


def test_unlabeled_target_in_the_loop_sends_its_style_and_image_count_only(site_dir, tmp_path):
    other = StyleEntry({layer: {stat: torch.ones(channels) for stat in STYLE_STATS}
                        for layer, channels in layer_channels(build_model(load_config(None, TINY).model, 4),
                                                              2).items()}, 10)
    cfg, model, content, context = _send(site_dir, tmp_path, "crosssim", MessageType.TRAIN, unlabeled=True,
                                         style_bank={"3": other})
    assert set(content.keys()) == {STYLE_RECORD, "metrics"}  # no weights, no prototypes
    assert set(content["metrics"].keys()) == {TARGET_IMAGES, "compute-s", "load-s"}
    images = len(load_site(site_dir, cfg.data, labeled=False, cache_dir=tmp_path / "cache"))
    assert content["metrics"][TARGET_IMAGES] == images
    assert_only_declared_style(content[STYLE_RECORD].to_torch_state_dict(), model, cfg, expected_count=images)
    assert len(context.state) == 0  # nothing kept at the node either


def test_with_the_default_style_bank_off_a_crosssim_site_sends_no_style(site_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(TINY, "style-mix-probability", 0.0)
    global_protos = Prototypes(torch.nn.functional.normalize(torch.randn(4, 128), dim=1), torch.tensor([5, 5, 5, 0]))
    _, _, content, _ = _send(site_dir, tmp_path, "crosssim", MessageType.TRAIN, global_protos)
    assert set(content.keys()) == {"arrays", "prototypes", "metrics"}
