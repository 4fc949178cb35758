"""The resident site worker: the ClientApp's records through it equal those computed in the ClientApp process."""

import subprocess
import sys
import time

import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.app import SITE_REFUSED_CODE
from client.app import app as client_app
from client.site_worker import WORKER_SOCKET_ENV, WorkerUnavailable, call, run_handler, wait_until_listening
from crosssim.boundary import (ARRAYS_RECORD, BATCHNORM_STATE_RECORD, COMPUTE_SECONDS, CONFIG_RECORD, METRICS_RECORD,
                               PROTOTYPES_RECORD, ROUND_LAMBDA, ROUND_LR, SERVER_ROUND)
from crosssim.config import load_config
from crosssim.data.synth import CLASSES as SYNTH_CLASSES
from crosssim.data.synth import generate_hospitals
from crosssim.federated import wire_config
from crosssim.model import build_model
from crosssim.wire import to_wire

TINY = {"classes": ",".join(SYNTH_CLASSES), "image-size": 32, "batch-size": 8, "local-epochs": 1, "min-count": 2,
        "augment": False, "strategy": "fedbn"}  # FedBN: the site keeps its BatchNorm layers in the context's state
WORKER_START_TIMEOUT_S = 60.0
TIMING_METRICS = {COMPUTE_SECONDS, "load-s"}  # wall-clock figures: the only values allowed to differ


@pytest.fixture(scope="module")
def worker_site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site_worker")
    return generate_hospitals(out / "sites", images_per_site=12, image_size=32).source_sites[0]


@pytest.fixture(scope="module")
def worker_socket(tmp_path_factory):
    """A site worker process on a socket of its own; stopped by its PID at the end."""
    path = tmp_path_factory.mktemp("worker") / "worker.sock"
    process = subprocess.Popen([sys.executable, "-m", "client.site_worker", "--socket", str(path)])
    try:
        assert wait_until_listening(process, path, WORKER_START_TIMEOUT_S) is None
        yield str(path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _train_message(site_dir, cache_dir, node_id: int = 7) -> tuple[Message, Context]:
    cfg = load_config(None, TINY)
    torch.manual_seed(0)  # the same global model in every message
    state = build_model(cfg.model, len(cfg.data.classes)).state_dict()
    config = ConfigRecord({**wire_config(cfg), SERVER_ROUND: 1, ROUND_LR: cfg.train.lr, ROUND_LAMBDA: 0.0})
    metadata = Metadata(run_id=1, message_id="m-1", src_node_id=0, dst_node_id=node_id, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=node_id, state=RecordDict(), run_config={},
                      node_config={"data": str(site_dir), "site": "a", "cache": str(cache_dir)})
    content = RecordDict({ARRAYS_RECORD: ArrayRecord(to_wire(state, cfg.federation.update_dtype)),
                          CONFIG_RECORD: config})
    return Message(content=content, metadata=metadata), context


def _assert_same_arrays(a: ArrayRecord, b: ArrayRecord) -> None:
    left, right = a.to_torch_state_dict(), b.to_torch_state_dict()
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_worker_reply_and_state_equal_the_in_process_ones(worker_site, worker_socket, tmp_path):
    msg, context = _train_message(worker_site, tmp_path / "cache")
    here_msg, here_context = _train_message(worker_site, tmp_path / "cache")
    through = call(worker_socket, "train", msg.content, context, {})
    here = run_handler("train", here_msg.content, here_context, {})
    for name in (ARRAYS_RECORD, PROTOTYPES_RECORD):
        _assert_same_arrays(through[name], here[name])
    drop = lambda metrics: {k: v for k, v in metrics.items() if k not in TIMING_METRICS}  # noqa: E731
    assert drop(through[METRICS_RECORD]) == drop(here[METRICS_RECORD])
    _assert_same_arrays(context.state[BATCHNORM_STATE_RECORD], here_context.state[BATCHNORM_STATE_RECORD])


def test_client_app_uses_the_worker_and_falls_back_without_it(worker_site, worker_socket, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setenv(WORKER_SOCKET_ENV, worker_socket)
    reply = client_app(*_train_message(worker_site, tmp_path / "cache"))
    assert not reply.has_error(), reply.error
    assert "computing this train message in the ClientApp process" not in capsys.readouterr().out
    monkeypatch.setenv(WORKER_SOCKET_ENV, str(tmp_path / "no-worker.sock"))
    fallback = client_app(*_train_message(worker_site, tmp_path / "cache"))
    assert not fallback.has_error(), fallback.error
    assert "computing this train message in the ClientApp process" in capsys.readouterr().out
    _assert_same_arrays(reply.content[ARRAYS_RECORD], fallback.content[ARRAYS_RECORD])


def test_refusal_and_failure_come_back_and_the_worker_still_answers(worker_site, worker_socket, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv(WORKER_SOCKET_ENV, worker_socket)
    unlabeled = tmp_path / "no-labels"
    unlabeled.mkdir()
    refused = client_app(*_train_message(unlabeled, tmp_path / "cache"))
    assert refused.has_error() and refused.error.code == SITE_REFUSED_CODE
    assert "labels.csv" in refused.error.reason and "\n" not in refused.error.reason
    msg, context = _train_message(worker_site, tmp_path / "cache")
    del msg.content[ARRAYS_RECORD]  # a handler bug at the site: a traceback, not a dead worker
    with pytest.raises(RuntimeError, match="KeyError"):
        call(worker_socket, "train", msg.content, context, {})
    assert not client_app(*_train_message(worker_site, tmp_path / "cache")).has_error()


def test_call_without_a_worker_is_unavailable(tmp_path):
    msg, context = _train_message(tmp_path, tmp_path / "cache")
    with pytest.raises(WorkerUnavailable, match="no answer from the site worker"):
        call(str(tmp_path / "absent.sock"), "train", msg.content, context, {})
