"""CrossSimStrategy: prototype aggregation, FedBN, checkpoints and resume (in-process, no Ray, no sockets)."""

import json
import shutil
import time
from collections.abc import Iterable

import pytest
import torch
from flwr.app import (DEFAULT_TTL, ArrayRecord, Context, Error, Message, MessageType, Metadata, MetricRecord,
                      RecordDict)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from client.app import app as client_app
from crosssim.boundary import BATCHNORM_STATE_RECORD, SERVER_ROUND, STYLE_BANK_RECORD
from crosssim.checkpoint import load_checkpoint
from crosssim.config import load_config
from crosssim.data.sites import LABELS_FILENAME, read_labels_csv, write_labels_csv
from crosssim.data.synth import generate_hospitals
from crosssim.federated import prototypes_to_arrays, round_schedule
from crosssim.model import batchnorm_state_keys, build_model
from crosssim.prototypes import Prototypes
from crosssim.style import bank_from_arrays, layer_channels
from crosssim.wire import FLOATS_ARRAY, from_wire, to_wire
from server.app import ServerSettings, run_federation
from server.store import RunStore
from server.strategy import _split_replies, build_strategy

CLASSES = ("normal", "nodule", "mass", "effusion")
TINY = {"classes": ",".join(CLASSES), "image-size": 32, "batch-size": 8, "local-epochs": 1, "min-count": 2,
        "augment": False}


class LoopbackGrid(Grid):
    """Hands each message to the ClientApp in this process, one Context per node; records train messages.

    Only what ``Strategy.start`` uses is implemented.
    """

    def __init__(self, site_dirs, cache_dir, unlabeled_dirs=()) -> None:
        self.contexts = {
            node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"data": str(d), "site": d.name, "cache": str(cache_dir),
                                       "unlabeled": i >= len(site_dirs)})
            for i, (node, d) in enumerate(enumerate([*site_dirs, *unlabeled_dirs], start=1))}
        self.train_sent: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.train_configs: list[dict] = []
        self.sent: list[tuple[int, Message]] = []  # (server round when sent, message), in order

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append((int(msg.content["config"][SERVER_ROUND]), msg))  # Flower reuses the config record
            if msg.metadata.message_type == MessageType.TRAIN:
                self.train_sent.append((int(msg.content["config"][SERVER_ROUND]),
                                        msg.content["arrays"].to_torch_state_dict()))
                self.train_configs.append(dict(msg.content["config"]))
            replies.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


@pytest.fixture
def flower_task(monkeypatch):
    """Flower stamps run and node ids on every message it creates; give this test process some."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("strategy")
    return generate_hospitals(out / "sites", images_per_site=12, image_size=32).source_sites[:2]


def _reply(node: int, state: dict, protos: Prototypes, num_examples: int,
           update_dtype: str = "float32") -> Message:
    metadata = Metadata(run_id=1, message_id=f"r-{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="m",
                        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
    content = RecordDict({"arrays": ArrayRecord(to_wire(state, update_dtype)),
                          "prototypes": ArrayRecord(prototypes_to_arrays(protos)),
                          "metrics": MetricRecord({"num-examples": num_examples, "loss": 1.0, "compute-s": 0.1,
                                                   "load-s": 0.0, "site-class-counts": [num_examples, 0, 0, 0]})})
    return Message(content=content, metadata=metadata)


def _filled(state: dict, value: float, drop: set[str] = frozenset()) -> dict:
    return {k: torch.full_like(v, value) for k, v in state.items() if k not in drop}


def _strategy(tmp_path, strategy: str):
    cfg = load_config(None, {**TINY, "strategy": strategy})
    state = build_model(cfg.model, len(CLASSES)).state_dict()
    return build_strategy(cfg, CLASSES, state, RunStore(tmp_path), num_sites=2, progress=lambda _: None), state


def test_prototypes_are_count_weighted_and_never_averaged_into_weights(tmp_path):
    strategy, state = _strategy(tmp_path, "crosssim")
    e0, e1, junk = torch.eye(128)[0], torch.eye(128)[1], torch.full((128,), 9.0)
    site_a = Prototypes(torch.stack([e0, junk, e0, e0]), torch.tensor([3, 0, 2, 1]))  # class 1 under min-count
    site_b = Prototypes(torch.stack([e1, e1, e1, e1]), torch.tensor([1, 4, 0, 0]))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _filled(state, 1.0), site_a, 1),
                                             _reply(2, _filled(state, 3.0), site_b, 3)])
    merged = strategy.prototypes
    assert torch.allclose(merged.vectors[0], (3 * e0 + e1) / 4)
    assert torch.equal(merged.vectors[1], e1)  # the site that sent count 0 contributed nothing
    assert merged.counts.tolist() == [4, 4, 2, 1]
    averaged = arrays.to_torch_state_dict()
    assert set(averaged) == set(state)  # weights only: no prototype tensors
    for key, value in averaged.items():
        assert value.dtype == state[key].dtype
        if value.is_floating_point():
            assert torch.allclose(value, torch.full_like(value, 2.5))  # (1·1 + 3·3) / 4, by num-examples


def test_fedbn_never_averages_batchnorm_layers(tmp_path):
    strategy, state = _strategy(tmp_path, "fedbn")
    bn_keys = batchnorm_state_keys(build_model(strategy.cfg.model, len(CLASSES)))
    protos = Prototypes.empty(len(CLASSES), 128)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _filled(state, 1.0, bn_keys), protos, 1),
                                             _reply(2, _filled(state, 3.0, bn_keys), protos, 1)])
    averaged = arrays.to_torch_state_dict()
    for key in bn_keys:
        assert torch.equal(averaged[key], state[key])  # still the server's, untouched by any site
    assert all(torch.allclose(averaged[k], torch.full_like(averaged[k], 2.0))
               for k in set(state) - bn_keys if averaged[k].is_floating_point())
    with pytest.raises(RuntimeError, match="rejected: weights do not match the model"):
        strategy.aggregate_train(2, [_reply(1, _filled(state, 1.0), protos, 1)])  # it sent its local BN layers


def test_bad_updates_are_rejected_and_the_aggregate_is_that_of_the_accepted_replies(tmp_path):
    strategy, state = _strategy(tmp_path, "fedavg")
    protos = Prototypes.empty(len(CLASSES), 128)
    first_float = next(k for k, v in state.items() if v.is_floating_point())
    nan = _filled(state, 1.0)
    nan[first_float][0] = float("nan")
    wrong_shape = _filled(state, 1.0)
    wrong_shape[first_float] = torch.ones(3)
    bad_protos = Prototypes(torch.full((len(CLASSES), 128), float("inf")), torch.ones(len(CLASSES), dtype=torch.int64))
    global_value = 0.5
    strategy.global_state = _filled(state, global_value)
    good = [_reply(n, _filled(state, global_value + d), protos, 1) for n, d in ((1, 0.1), (2, 0.2), (3, 0.3))]
    bad = [_reply(4, nan, protos, 1), _reply(5, wrong_shape, protos, 1),
           _reply(6, _filled(state, global_value + 1000 * 0.2), protos, 1),  # 1000x the typical update
           _reply(7, _filled(state, 0.7), bad_protos, 1)]
    arrays, _ = strategy.aggregate_train(1, good + bad)
    rejected = strategy.record.rejected
    assert [line.split(":")[0] for line in rejected] == ["node 4", "node 5", "node 7", "node 6"]
    assert "non-finite" in rejected[0] and "'floats' holds" in rejected[1] and "prototypes" in rejected[2]
    assert "x the round's median" in rejected[3]
    assert strategy.record.sites == 3
    for key, value in arrays.to_torch_state_dict().items():
        if value.is_floating_point():  # exactly the mean of the three accepted replies
            assert torch.allclose(value, torch.full_like(value, global_value + 0.2))
    assert '"rejected": ["node 4: rejected' in strategy.record.to_json()


def test_fedbn_round_keeps_each_sites_batchnorm_in_its_context(tmp_path, sites, flower_task):
    cfg = load_config(None, {**TINY, "strategy": "fedbn", "rounds": 1})
    grid = LoopbackGrid(sites, tmp_path / "cache")
    final = load_checkpoint(run_federation(grid, ServerSettings(cfg, tmp_path / "run", False, 2), lambda _: None))
    initial = from_wire(grid.train_sent[0][1], final.state_dict)
    bn_keys = batchnorm_state_keys(final.build_model())
    assert all(torch.equal(final.state_dict[k], initial[k]) for k in bn_keys)
    local = [ctx.state[BATCHNORM_STATE_RECORD].to_torch_state_dict() for ctx in grid.contexts.values()]
    assert all(set(bn) == bn_keys for bn in local)
    running_mean = next(k for k in sorted(bn_keys) if k.endswith("running_mean"))
    assert not torch.equal(local[0][running_mean], initial[running_mean])  # trained locally, kept locally


def test_resume_continues_from_latest_with_the_same_round_counter(tmp_path, sites, flower_task):
    run = tmp_path / "run"
    first = LoopbackGrid(sites, tmp_path / "cache")
    cfg = load_config(None, {**TINY, "rounds": 1})
    run_federation(first, ServerSettings(cfg, run, False, 2), lambda _: None)  # "stopped" after round 1
    round_1 = load_checkpoint(run / "round-0001.pt")

    resumed = LoopbackGrid(sites, tmp_path / "cache")
    final = load_checkpoint(run_federation(resumed, ServerSettings(load_config(None, {**TINY, "rounds": 2}), run,
                                                                   True, 2), lambda _: None))
    assert {r for r, _ in resumed.train_sent} == {2}  # remaining rounds only
    for _, sent in resumed.train_sent:  # round 2 started from the saved state
        sent = from_wire(sent, round_1.state_dict)
        assert all(torch.equal(sent[k], round_1.state_dict[k]) for k in sent)
    round_2 = load_checkpoint(run / "round-0002.pt")
    assert round_2.round == final.round == load_checkpoint(run / "latest.pt").round == 2
    assert round_2.kind == "federated"
    assert any(not torch.equal(round_2.state_dict[k], round_1.state_dict[k]) for k in round_1.state_dict)
    assert [json.loads(line)["round"] for line in (run / "rounds.jsonl").read_text().splitlines()] == [1, 2]
    assert final.source is not None and final.source.count > 0
    assert abs(final.source.confidence_histogram.sum() - 1.0) < 1e-6
    assert bool(final.prototypes.present.any())
    assert 0.0 <= final.source.shift_reference["prototype_distance"] <= 2.0  # reference for the target's alarm


@pytest.mark.parametrize("strategy,lambdas", [("crosssim", [0.0, 0.25, 0.5]), ("fedavg", [0.0, 0.0, 0.0]),
                                              ("fedprox", [0.0, 0.0, 0.0]), ("fedbn", [0.0, 0.0, 0.0])])
def test_only_crosssim_uses_the_similarity_loss_once_prototypes_exist(strategy, lambdas):
    cfg = load_config(None, {"strategy": strategy, "lambda-sim": 0.5, "lambda-warmup": 2, "rounds": 3})
    assert [round_schedule(cfg, r)[1] for r in (1, 2, 3)] == lambdas


def test_fedprox_sends_mu_and_sites_add_the_proximal_term(tmp_path, sites, flower_task):
    cfg = load_config(None, {**TINY, "strategy": "fedprox", "proximal-mu": 100.0, "rounds": 1, "batch-size": 4})
    grid = LoopbackGrid(sites, tmp_path / "cache")
    run_federation(grid, ServerSettings(cfg, tmp_path / "run", False, 2), lambda _: None)
    assert all(config["proximal-mu"] == 100.0 for config in grid.train_configs)
    train = json.loads((tmp_path / "run" / "rounds.jsonl").read_text())["train"]
    assert train["loss"] > train["ce-loss"] and train["sim-loss"] == 0.0  # loss = CE + μ/2·‖w − w_global‖²


def test_a_site_with_unknown_labels_fails_its_reply_in_one_line_and_the_round_proceeds(tmp_path, sites,
                                                                                      flower_task):
    bad = shutil.copytree(sites[0], tmp_path / "hospital-x")
    rows = list(read_labels_csv(bad / LABELS_FILENAME).items())
    write_labels_csv(bad / LABELS_FILENAME, [(path, "pneumothorax") if i == 0 else (path, label)
                                             for i, (path, label) in enumerate(rows)])
    cfg = load_config(None, {**TINY, "rounds": 1, "min-sites": 2})
    lines: list[str] = []
    run_federation(LoopbackGrid([*sites, bad], tmp_path / "cache"), ServerSettings(cfg, tmp_path / "run", False, 3),
                   lines.append)
    record = json.loads((tmp_path / "run" / "rounds.jsonl").read_text())
    assert record["sites"] == 2 and len(record["failures"]) == 1
    failure = record["failures"][0]
    assert failure.startswith("node 3: ") and str(bad / LABELS_FILENAME) in failure and "'pneumothorax' ×1" in failure
    assert "\n" not in failure and f"round 1: {failure}" in lines  # the server's log shows it as one line
    assert sum(line.startswith("node ") and "normal=" in line for line in lines) == 2  # round 1: counts per site


def test_style_bank_gathers_every_site_and_the_unlabeled_target_which_never_trains_or_evaluates(
        tmp_path, sites, flower_task):
    target = generate_hospitals(tmp_path / "target-sites", images_per_site=8, image_size=32).target_site
    cfg = load_config(None, {**TINY, "rounds": 2, "style-mix-probability": 0.5})
    grid = LoopbackGrid(sites, tmp_path / "cache", unlabeled_dirs=[target])
    final = load_checkpoint(run_federation(grid, ServerSettings(cfg, tmp_path / "run", False, 2), lambda _: None))
    target_node = 3
    to_target = [m.metadata.message_type for _, m in grid.sent if m.metadata.dst_node_id == target_node]
    assert to_target == [MessageType.TRAIN, MessageType.TRAIN]  # the global model each round, never evaluate
    second_round = [m for r, m in grid.sent if m.metadata.message_type == MessageType.TRAIN and r == 2]
    assert len(second_round) == 3
    shapes = layer_channels(build_model(cfg.model, len(CLASSES)), cfg.method.style_layers)
    for msg in second_round:
        bank = bank_from_arrays(msg.content[STYLE_BANK_RECORD].to_torch_state_dict(), shapes)
        assert set(bank) == {"1", "2", "3"}  # both sources and the target, from round 1
    rounds = [json.loads(line) for line in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    assert all(r["sites"] == 2 and r["target_images"] == 8 and not r["failures"] for r in rounds)
    assert set(bank_from_arrays(final.extra["style_bank"], shapes)) == {"1", "2", "3"}  # kept for --resume


@pytest.mark.parametrize("aggregation,beta", [("median", 0.2), ("trimmed-mean", 0.34)])
def test_median_and_trimmed_mean_follow_flowers_robust_strategies(tmp_path, aggregation, beta):
    cfg = load_config(None, {**TINY, "strategy": "fedavg", "aggregation": aggregation, "trimmed-mean-beta": beta})
    state = build_model(cfg.model, len(CLASSES)).state_dict()
    strategy = build_strategy(cfg, CLASSES, state, RunStore(tmp_path), num_sites=3, progress=lambda _: None)
    strategy.global_state = _filled(state, 0.5)
    protos = Prototypes.empty(len(CLASSES), 128)
    replies = [_reply(n, _filled(state, 0.5 + d), protos, count) for n, d, count in ((1, 0.1, 1), (2, 0.2, 1),
                                                                                    (3, 0.9, 50))]
    arrays, _ = strategy.aggregate_train(1, replies)
    for key, value in arrays.to_torch_state_dict().items():
        assert value.dtype == state[key].dtype
        if value.is_floating_point():  # the middle reply, whatever the big site's weight (the mean would be ~1.37)
            assert torch.allclose(value, torch.full_like(value, 0.7))


class DroppingGrid(LoopbackGrid):
    """A LoopbackGrid that loses some train replies: ``drops[(round, node)]`` = how many times in a row."""

    def __init__(self, site_dirs, cache_dir, drops: dict[tuple[int, int], int]) -> None:
        super().__init__(site_dirs, cache_dir)
        self.drops = dict(drops)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        kept = []
        for msg in messages:
            key = (int(msg.content["config"][SERVER_ROUND]), msg.metadata.dst_node_id)
            if msg.metadata.message_type == MessageType.TRAIN and self.drops.get(key, 0) > 0:
                self.drops[key] -= 1  # the site never answers this one: as if killed before replying
                self.sent.append((key[0], msg))
            else:
                kept.append(msg)
        return super().send_and_receive(kept, timeout=timeout)


def _rounds(run) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


def test_a_round_short_of_min_sites_is_sent_again_and_a_missing_reply_is_a_failure(tmp_path, sites, flower_task):
    cfg = load_config(None, {**TINY, "rounds": 2, "min-sites": 2, "round-timeout-s": 5})
    grid, lines = DroppingGrid(sites, tmp_path / "cache", {(2, 2): 1}), []
    run_federation(grid, ServerSettings(cfg, tmp_path / "run", False, 2), lines.append)
    first, second = _rounds(tmp_path / "run")
    assert first["retries"] == 0 and not first["failures"]
    assert second["retries"] == 1 and second["sites"] == 2
    assert second["failures"] == ["node 2: no reply within the round timeout (5 s)"]
    assert "round 2: 1 of the 2 train replies a round needs (min-sites); sending it again (retry 1/2)" in lines
    assert sum(r == 2 and m.metadata.message_type == MessageType.TRAIN for r, m in grid.sent) == 4


def test_a_site_that_failed_training_is_not_asked_to_evaluate(tmp_path, sites, flower_task):
    cfg = load_config(None, {**TINY, "rounds": 1, "min-sites": 1})
    grid = DroppingGrid(sites, tmp_path / "cache", {(1, 2): 1})
    run_federation(grid, ServerSettings(cfg, tmp_path / "run", False, 2), lambda _: None)
    (record,) = _rounds(tmp_path / "run")
    assert record["sites"] == 1 and record["retries"] == 0 and len(record["failures"]) == 1
    evaluated = [m.metadata.dst_node_id for _, m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert evaluated == [1] and not record["evaluate_failures"]


def test_retries_spent_stop_the_run_with_one_line_and_the_last_complete_round_kept(tmp_path, sites, flower_task):
    cfg = load_config(None, {**TINY, "rounds": 3, "min-sites": 2, "round-retries": 1, "round-timeout-s": 5})
    run, lines = tmp_path / "run", []
    grid = DroppingGrid(sites, tmp_path / "cache", {(2, 1): 5})
    assert run_federation(grid, ServerSettings(cfg, run, False, 2), lines.append) is None
    assert [r["round"] for r in _rounds(run)] == [1]
    assert load_checkpoint(run / "latest.pt").round == 1 and not (run / "final.pt").exists()
    stop = [line for line in lines if "the run stops" in line]
    assert len(stop) == 1 and "\n" not in stop[0]
    assert stop[0].startswith("round 2: 1 of the 2 train replies a round needs (min-sites) after 1 retry(ies)")
    assert "node 1: no reply within the round timeout (5 s)" in stop[0] and "--resume" in stop[0]


class CorruptingGrid(LoopbackGrid):
    """A LoopbackGrid whose node ``bad`` really trains, then its train reply is spoiled: round 1 a NaN weight,
    round 2 a wrong shape, round 3 1000x its update."""

    def __init__(self, site_dirs, cache_dir, bad: int) -> None:
        super().__init__(site_dirs, cache_dir)
        self.bad = bad

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m.content["arrays"].to_torch_state_dict() for m in messages}
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.src_node_id != self.bad or reply.metadata.message_type != MessageType.TRAIN:
                continue
            server_round = self.sent[-1][0]
            state = reply.content["arrays"].to_torch_state_dict()  # packed: crosssim.wire
            floats = state[FLOATS_ARRAY]
            if server_round == 1:
                floats[0] = float("nan")
            elif server_round == 2:
                state[FLOATS_ARRAY] = floats[:3]
            else:
                start = sent[self.bad][FLOATS_ARRAY].float()
                state[FLOATS_ARRAY] = start + 1000 * (floats.float() - start)
            reply.content["arrays"] = ArrayRecord(state)
        return replies


def test_a_site_sending_nan_a_wrong_shape_or_1000x_is_rejected_every_round_and_the_run_equals_the_good_sites(
        tmp_path, sites, flower_task):
    cfg = load_config(None, {**TINY, "rounds": 3, "min-sites": 2, "strategy": "fedavg"})
    bad_site = shutil.copytree(sites[0], tmp_path / "hospital-bad")
    with_bad = load_checkpoint(run_federation(CorruptingGrid([*sites, bad_site], tmp_path / "cache", bad=3),
                                              ServerSettings(cfg, tmp_path / "with-bad", False, 3), lambda _: None))
    good_only = load_checkpoint(run_federation(LoopbackGrid(sites, tmp_path / "cache"),
                                               ServerSettings(cfg, tmp_path / "good-only", False, 2), lambda _: None))
    rounds = _rounds(tmp_path / "with-bad")
    assert [len(r["rejected"]) for r in rounds] == [1, 1, 1] and all(r["sites"] == 2 for r in rounds)
    reasons = [r["rejected"][0] for r in rounds]
    assert all(reason.startswith("node 3: rejected: ") for reason in reasons)
    assert "non-finite" in reasons[0] and "'floats' holds 3 values" in reasons[1]
    assert "x the round's median" in reasons[2]
    for key, value in good_only.state_dict.items():  # the aggregate is the two good sites' every round
        assert torch.allclose(with_bad.state_dict[key].float(), value.float(), atol=1e-5), key


def _message(src: int, dst: int, message_id: str, reply_to: str = "", error: Error | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id=message_id, src_node_id=src, dst_node_id=dst,
                        reply_to_message_id=reply_to, group_id="1", created_at=time.time(), ttl=DEFAULT_TTL,
                        message_type=MessageType.TRAIN)
    if error is None:
        return Message(content=RecordDict(), metadata=metadata)
    return Message(error=error, metadata=metadata)


def test_an_offline_node_error_from_the_superlink_is_put_on_that_node_once():
    superlink = 1  # Flower writes "node unavailable" replies from the SuperLink's own node id
    sent = [_message(0, node, f"m{node}") for node in (11, 12, 13)]
    offline = _message(superlink, superlink, "", reply_to="m12",
                       error=Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"))
    ok, errors = _split_replies([_message(11, 0, "r11", "m11"), offline], sent, timeout_s=5)
    assert [m.metadata.src_node_id for m in ok] == [11]
    assert errors == ["node 12: Node Unavailable", "node 13: no reply within the round timeout (5 s)"]
