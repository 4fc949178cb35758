"""update-dtype = float16: half the bytes on the wire both ways, float32 averaging and float32 checkpoints."""

import time

import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.common.serde import array_record_to_proto
from test_strategy import LoopbackGrid, _reply, flower_task  # noqa: F401  (flower_task is a fixture)

from client.app import app as client_app
from crosssim.boundary import ROUND_LAMBDA, ROUND_LR, SERVER_ROUND
from crosssim.checkpoint import load_checkpoint
from crosssim.config import load_config
from crosssim.data.synth import CLASSES as SYNTH_CLASSES
from crosssim.data.synth import generate_hospitals
from crosssim.federated import wire_config
from crosssim.model import build_model
from crosssim.prototypes import Prototypes
from crosssim.wire import FLOATS_ARRAY, INTEGERS_ARRAY, to_wire
from server.app import ServerSettings, run_federation
from server.store import RunStore
from server.strategy import build_strategy

TINY = {"classes": ",".join(SYNTH_CLASSES), "image-size": 32, "batch-size": 8, "local-epochs": 1, "min-count": 2,
        "augment": False}
HALF_BYTES = (0.45, 0.55)  # float16 reply / float32 reply, serialized (headers and int buffers aside)


@pytest.fixture(scope="module")
def dtype_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("update_dtype")
    return generate_hospitals(out / "sites", images_per_site=12, image_size=32).source_sites[:2]


def _train_reply(site_dir, cache_dir, update_dtype: str) -> RecordDict:
    """One train message through the ClientApp, as the server sends it (weights in ``update_dtype``)."""
    cfg = load_config(None, {**TINY, "update-dtype": update_dtype})
    state = build_model(cfg.model, len(cfg.data.classes)).state_dict()
    config = ConfigRecord({**wire_config(cfg), SERVER_ROUND: 1, ROUND_LR: cfg.train.lr, ROUND_LAMBDA: 0.0})
    metadata = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data": str(site_dir), "site": "a", "cache": str(cache_dir)})
    content = RecordDict({"arrays": ArrayRecord(to_wire(state, update_dtype)), "config": config})
    reply = client_app(Message(content=content, metadata=metadata), context)
    assert not reply.has_error(), reply.error
    return reply.content


def test_float16_train_reply_sends_half_the_weight_bytes(dtype_sites, tmp_path):
    half = _train_reply(dtype_sites[0], tmp_path / "cache", "float16")
    full = _train_reply(dtype_sites[0], tmp_path / "cache", "float32")
    sent = half["arrays"].to_torch_state_dict()
    assert set(sent) == {FLOATS_ARRAY, INTEGERS_ARRAY}  # the whole model in two arrays (crosssim.wire)
    assert sent[FLOATS_ARRAY].dtype == torch.float16
    assert sent[INTEGERS_ARRAY].dtype == torch.int64  # num_batches_tracked as it was
    assert full["arrays"].to_torch_state_dict()[FLOATS_ARRAY].dtype == torch.float32
    ratio = array_record_to_proto(half["arrays"]).ByteSize() / array_record_to_proto(full["arrays"]).ByteSize()
    assert HALF_BYTES[0] < ratio < HALF_BYTES[1], ratio


def test_server_averages_float16_replies_in_float32(tmp_path):
    cfg = load_config(None, {**TINY, "update-dtype": "float16"})
    classes = tuple(cfg.data.classes)
    state = build_model(cfg.model, len(classes)).state_dict()
    strategy = build_strategy(cfg, classes, state, RunStore(tmp_path), num_sites=2, progress=lambda _: None)
    generator = torch.Generator().manual_seed(0)
    sites = [{k: (torch.randn(v.shape, generator=generator) * 3).half() if v.is_floating_point() else v
              for k, v in state.items()} for _ in range(2)]
    protos = Prototypes.empty(len(classes), 128)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, sites[0], protos, 1, "float16"),
                                             _reply(2, sites[1], protos, 3, "float16")])
    averaged = arrays.to_torch_state_dict()
    assert averaged.keys() == state.keys()
    for key, value in averaged.items():
        assert value.dtype == state[key].dtype  # float32 weights, int64 counters
    floats = [k for k, v in state.items() if v.is_floating_point()]
    expected = {k: (sites[0][k].double() + 3 * sites[1][k].double()) / 4 for k in floats}
    assert all(torch.allclose(averaged[k].double(), expected[k], rtol=1e-6, atol=1e-6) for k in floats)
    # The exact average is not a float16 number: it was neither summed nor stored in float16.
    assert any(not torch.equal(averaged[k], averaged[k].half().float()) for k in floats)
    assert all(v.dtype == torch.float32 for v in strategy.global_state.values() if v.is_floating_point())


def test_float16_round_sends_float16_and_checkpoints_float32(tmp_path, dtype_sites, flower_task):  # noqa: F811
    cfg = load_config(None, {**TINY, "update-dtype": "float16", "rounds": 1})
    grid = LoopbackGrid(dtype_sites, tmp_path / "cache")
    final = load_checkpoint(run_federation(grid, ServerSettings(cfg, tmp_path / "run", False, 2), lambda _: None))
    assert grid.train_sent, "no train message was sent"
    for _, sent in grid.train_sent:  # server → site
        assert sent[FLOATS_ARRAY].dtype == torch.float16
    model_keys = build_model(cfg.model, len(cfg.data.classes)).state_dict().keys()
    for ckpt in (final, load_checkpoint(tmp_path / "run" / "round-0001.pt")):
        assert ckpt.state_dict.keys() == model_keys
        assert all(v.dtype == torch.float32 for v in ckpt.state_dict.values() if v.is_floating_point())
        assert all(not v.is_floating_point() for k, v in ckpt.state_dict.items() if k.endswith("num_batches_tracked"))
