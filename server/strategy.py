"""CrossSimStrategy: Flower's FedAvg plus prototypes, FedBN, checkpoints and the round log.

Per round, in Flower's order: ``configure_train`` (round LR and λ, global prototypes) → ``aggregate_train``
(count-weighted prototypes taken out of each reply, then FedAvg averages the one ArrayRecord left) →
``configure_evaluate`` → ``aggregate_evaluate`` (pooled validation summaries = the ATC reference) →
``finish_round`` (passed as ``evaluate_fn``: checkpoint, RoundRecord line, progress line).

``round-style = one-message`` (the default) sends each site one message a round: round k's train message asks
the site to evaluate the model it brings (round k-1's aggregate) before training, so round k-1's evaluate part,
ATC reference and checkpoint are completed when round k's train replies arrive; only after the last round does
an evaluate message go out. The records and checkpoints are those of ``two-messages`` (tests/test_round_style.py);
``latest.pt`` trails the running round by one. With ``fraction-train`` < 1 not every site trains each round, so
rounds stay two messages.

Every baseline is this one class: ``strategy`` is a config value the sites read (FedProx's ``proximal-mu``
travels in the config like every other key; FedBN's local layers are ``crosssim.federated.local_state_keys``).

``update-dtype = float16``: weights travel as float16 both ways; replies are cast to float32 before FedAvg
averages them, and the global state and checkpoints stay float32.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from crosssim.boundary import (ARRAYS_RECORD, COMPUTE_SECONDS, CONFIG_RECORD, EVALUATION_RECORD, LOAD_SECONDS,
                               METRICS_RECORD, NUM_EXAMPLES, PROTOTYPES_RECORD, ROUND_EVALUATE, ROUND_LAMBDA, ROUND_LR,
                               SITE_CLASS_COUNTS, STYLE_BANK_EXTRA, STYLE_BANK_RECORD, STYLE_RECORD, TARGET_IMAGES,
                               TIMINGS_RECORD)
from crosssim.checkpoint import Checkpoint, SourceStats
from crosssim.config import CrossSimConfig
from crosssim.federated import (local_state_keys, merge_state, prototypes_from_arrays, prototypes_to_arrays,
                                round_schedule, source_stats)
from crosssim.method import uses_style_bank
from crosssim.model import build_model
from crosssim.prototypes import Prototypes, aggregate_prototypes
from crosssim.style import StyleEntry, aggregate_bank, bank_to_arrays, layer_channels
from crosssim.wire import from_wire, to_wire
from server.reply_check import norm_outliers, state_problem, update_norm
from server.store import RoundRecord, RunStore

Progress = Callable[[str], None]
# Flower wraps an exception raised in a ClientApp as "<class 'T'>:<'message'>"; CrossSim's own refusals are one line.
FLOWER_EXCEPTION_REASON = re.compile(r"^<class '(?P<type>[^']+)'>:<'(?P<message>.*)'>$", re.DOTALL)


def scalar_metrics_average(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's weighted average, keeping scalars only (histograms and counts go to SourceStats instead)."""
    averaged = aggregate_metricrecords(records, weighted_by_key)
    return MetricRecord({k: v for k, v in averaged.items() if not isinstance(v, list)})


def failure_line(msg: Message, node: int) -> str:
    """``node N: reason`` on one line, whether the site refused the message itself or Flower caught an exception."""
    reason = str(msg.error.reason)
    match = FLOWER_EXCEPTION_REASON.match(reason.strip())
    if match:
        message = match["message"].strip().splitlines()[-1] if match["message"].strip() else ""
        reason = f"{match['type'].rsplit('.', 1)[-1]}: {message.removeprefix('Message: ')}"
    return f"node {node}: {' '.join(reason.split())}"


class RoundAborted(RuntimeError):
    """Fewer than min-sites train replies after every retry: the run stops at its last complete round."""


def _split_replies(replies: Iterable[Message], sent: list[Message],
                   timeout_s: float) -> tuple[list[Message], list[str]]:
    """Usable replies, and one failure line per error reply and per node that sent none before the timeout.

    An error the SuperLink writes itself (a node gone offline) comes from the SuperLink's own id: it is put on the
    node the message went to, found by the message id it answers.
    """
    destination = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in sent if msg.metadata.message_id}
    nodes = {msg.metadata.dst_node_id for msg in sent}
    ok, errors, replied = [], [], set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if node not in nodes:
            node = destination.get(msg.metadata.reply_to_message_id, node)
        replied.add(node)
        if msg.has_error():
            errors.append(failure_line(msg, node))
        else:
            ok.append(msg)
    errors += [f"node {node}: no reply within the round timeout ({timeout_s:g} s)"
               for node in sorted(nodes - replied)]
    return ok, errors


def weight_averaging(cfg: CrossSimConfig, **flower_kwargs: Any) -> FedAvg:
    """Flower's own strategy whose ``aggregate_train`` combines the weights: FedAvg, FedMedian or FedTrimmedAvg."""
    if cfg.federation.aggregation == "median":
        return FedMedian(**flower_kwargs)
    if cfg.federation.aggregation == "trimmed-mean":
        return FedTrimmedAvg(beta=cfg.federation.trimmed_mean_beta, **flower_kwargs)
    return FedAvg(**flower_kwargs)


class CrossSimStrategy(FedAvg):
    """strategy = crosssim | fedavg | fedprox | fedbn: Flower's sampling and messages, the site decides the local
    loss; ``aggregation`` picks Flower's mean, median or trimmed mean for the weights."""

    def __init__(self, *, cfg: CrossSimConfig, classes: tuple[str, ...], global_state: dict[str, torch.Tensor],
                 store: RunStore, min_replies: int, round_offset: int = 0, prototypes: Prototypes | None = None,
                 style_bank: dict[str, StyleEntry] | None = None, progress: Progress = print,
                 **flower_kwargs: Any) -> None:
        super().__init__(**flower_kwargs)
        self.averaging = weight_averaging(cfg, **flower_kwargs)
        self.cfg, self.classes, self.store, self.progress = cfg, classes, store, progress
        self.min_replies = min_replies  # labeled train replies a round needs (else it is retried, then the run stops)
        self.train_call: tuple[ArrayRecord, ConfigRecord, Grid] | None = None  # this round's, for a retry
        self.train_sent: list[Message] = []  # this round's train messages (Flower sets their ids as it sends them)
        self.evaluate_sent: list[Message] = []
        self.failed_nodes: set[int] = set()  # nodes whose train reply failed this round: not asked to evaluate
        self.global_state = dict(global_state)
        self.round_offset = round_offset
        self.prototypes = prototypes
        self.style_bank: dict[str, StyleEntry] = dict(style_bank or {})  # node id → its latest style entry
        self.target_nodes: set[int] = set()  # unlabeled targets in the loop: they send styles, never evaluate
        model = build_model(cfg.model, len(classes))
        self.embedding_dim = model.embedding_dim
        self.style_shapes = layer_channels(model, cfg.method.style_layers)
        self.local_keys = local_state_keys(model, cfg.method.strategy)
        self.source: SourceStats | None = None
        self.last_checkpoint: Checkpoint | None = None
        self.record: RoundRecord | None = None
        self._started = 0.0
        self.one_message = cfg.federation.round_style == "one-message" and cfg.federation.fraction_train >= 1.0
        self.pending: tuple[RoundRecord, Checkpoint] | None = None  # one-message: the round awaiting its evaluation

    def global_round(self, server_round: int) -> int:
        """Flower counts the rounds of this process from 1; a resumed run continues the run's count."""
        return self.round_offset + server_round

    def _to_wire(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global weights as sent to sites: packed (``crosssim.wire``), floats in ``update-dtype``."""
        return ArrayRecord(to_wire(arrays.to_torch_state_dict(), self.cfg.federation.update_dtype))

    def _with_summaries(self, messages: Iterable[Message], style_bank: bool) -> list[Message]:
        """``messages`` with the global prototypes (and the style bank) added."""
        messages = list(messages)
        extra: dict[str, ArrayRecord] = {}
        if self.prototypes is not None:
            extra[PROTOTYPES_RECORD] = ArrayRecord(prototypes_to_arrays(self.prototypes))
        if style_bank and self.style_bank:
            extra[STYLE_BANK_RECORD] = ArrayRecord(bank_to_arrays(self.style_bank))
        for msg in messages:
            msg.content.update(extra)
        return messages

    def _style(self, msg: Message) -> StyleEntry:
        return StyleEntry.from_arrays(msg.content[STYLE_RECORD].to_torch_state_dict(), self.style_shapes)

    def round_record(self, server_round: int) -> RoundRecord:
        """The record of this Flower round, started when the round's first step runs."""
        current = self.global_round(server_round)
        if self.record is None or self.record.round != current:
            lr, lambda_sim = round_schedule(self.cfg, current)
            self.record = RoundRecord(round=current, lr=lr, lambda_sim=lambda_sim)
            self._started = time.perf_counter()
        return self.record

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's sampling and records, plus this round's LR and λ and the global prototypes."""
        record = self.round_record(server_round)
        config[ROUND_LR], config[ROUND_LAMBDA] = record.lr, record.lambda_sim
        config[ROUND_EVALUATE] = self.pending is not None
        self.train_call = (arrays, config, grid)
        messages = self._with_summaries(super().configure_train(record.round, self._to_wire(arrays), config, grid),
                                        style_bank=uses_style_bank(self.cfg))
        self.train_sent = messages
        record.timeline["train-sent"] = time.time()
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Prototypes count-weighted and removed from each reply, then Flower's mean, median or trimmed mean of the
        weights (float32); a round with fewer than min-sites usable replies is sent again (``round-retries``)."""
        record = self.round_record(server_round)
        ok, errors = _split_replies(self._take_reports("train", record, replies), self.train_sent,
                                    self.cfg.federation.round_timeout_s)
        for line in errors:
            self.progress(f"round {record.round}: {line}")
        record.failures += errors
        ok, site_prototypes, styles = self._checked(ok, record)
        trained = [msg for msg in ok if ARRAYS_RECORD in msg.content]
        if len(trained) < self.min_replies:
            return self._retry(server_round, record, len(trained))
        self.failed_nodes = {m.metadata.dst_node_id for m in self.train_sent} - {m.metadata.src_node_id for m in ok}
        self.style_bank = aggregate_bank(self.style_bank, styles)
        targets = [msg for msg in ok if ARRAYS_RECORD not in msg.content]  # unlabeled: a style and a count only
        self.target_nodes |= {msg.metadata.src_node_id for msg in targets}
        record.target_images = sum(int(msg.content[METRICS_RECORD][TARGET_IMAGES]) for msg in targets)
        ok = trained
        self.prototypes = aggregate_prototypes(site_prototypes, self.prototypes)
        averaged, metrics = self.averaging.aggregate_train(server_round, ok)
        self.global_state = merge_state(self.global_state, averaged.to_torch_state_dict())
        site_metrics = {f"node {msg.metadata.src_node_id}": msg.content[METRICS_RECORD] for msg in ok}
        record.train_s = time.perf_counter() - self._started
        record.sites = len(ok)
        record.examples = sum(int(m[NUM_EXAMPLES]) for m in site_metrics.values())
        record.train = dict(metrics or {})
        record.train_compute_s = [float(m[COMPUTE_SECONDS]) for m in site_metrics.values()]
        record.load_s = [float(m[LOAD_SECONDS]) for m in site_metrics.values()]
        record.class_counts = {node: [int(c) for c in m[SITE_CLASS_COUNTS]] for node, m in site_metrics.items()}
        if server_round == 1:  # the first round of this process: what each site brings, counts only
            for node, counts in record.class_counts.items():
                self.progress(f"{node}: " + ", ".join(f"{c}={n if n else f'<{self.cfg.method.min_count}'}"
                                                      for c, n in zip(self.classes, counts)))
        return ArrayRecord(self.global_state), metrics

    def _retry(self, server_round: int, record: RoundRecord,
               trained: int) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Send this round's train messages again, or stop the run once ``round-retries`` are spent."""
        needed = f"{trained} of the {self.min_replies} train replies a round needs (min-sites)"
        if record.retries >= self.cfg.federation.round_retries or self.train_call is None:
            raise RoundAborted(
                f"round {record.round}: {needed} after {record.retries} retry(ies) "
                f"({'; '.join(record.failures + record.rejected) or 'no site replied'}); the run stops: "
                f"{self.store.latest_path} holds round {record.round - 1}, continue with --resume")
        record.retries += 1
        self.progress(f"round {record.round}: {needed}; sending it again "
                      f"(retry {record.retries}/{self.cfg.federation.round_retries})")
        arrays, config, grid = self.train_call
        replies = grid.send_and_receive(self.configure_train(server_round, arrays, config, grid),
                                        timeout=self.cfg.federation.round_timeout_s)
        return self.aggregate_train(server_round, replies)

    def _checked(self, replies: list[Message],
                 record: RoundRecord) -> tuple[list[Message], list[Prototypes], dict[str, StyleEntry]]:
        """Replies that pass ``server.reply_check`` (weights as float32, summaries taken out), their
        prototypes and style entries; each rejected reply is one line in the log and in ``record.rejected``."""
        expected = {k: v for k, v in self.global_state.items() if k not in self.local_keys}
        accepted: dict[str, tuple[Message, Prototypes | None, StyleEntry | None]] = {}
        norms: dict[str, float] = {}
        rejected: list[str] = []
        for msg in replies:
            node = f"node {msg.metadata.src_node_id}"
            try:
                accepted[node] = self._parsed(msg, expected)
            except ValueError as exc:
                rejected.append(f"{node}: rejected: {exc}")
                continue
            if ARRAYS_RECORD in msg.content:
                norms[node] = update_norm(msg.content[ARRAYS_RECORD].to_torch_state_dict(), expected)
        for node, reason in norm_outliers(norms, self.cfg.federation.max_update_norm_ratio).items():
            rejected.append(f"{node}: rejected: {reason}")
            del accepted[node]
        for line in rejected:
            self.progress(f"round {record.round}: {line}")
        record.rejected += rejected
        return ([msg for msg, _, _ in accepted.values()],
                [protos for _, protos, _ in accepted.values() if protos is not None],
                {node.removeprefix("node "): style for node, (_, _, style) in accepted.items() if style is not None})

    def _parsed(self, msg: Message, expected: dict[str, torch.Tensor]) -> tuple[Message, Prototypes | None,
                                                                              StyleEntry | None]:
        """One reply's prototypes and style taken out and its weights cast to float32; ValueError if unusable."""
        style = None
        if STYLE_RECORD in msg.content:
            style = self._style(msg)  # StyleEntry.from_arrays refuses wrong shapes and non-finite values
            msg.content.pop(STYLE_RECORD)
        if ARRAYS_RECORD not in msg.content:
            return msg, None, style
        state = from_wire(msg.content[ARRAYS_RECORD].to_torch_state_dict(), expected)  # ValueError if it won't fit
        problem = state_problem(state)
        if problem:
            raise ValueError(problem)
        protos = prototypes_from_arrays(msg.content[PROTOTYPES_RECORD].to_torch_state_dict(), len(self.classes),
                                        self.embedding_dim)
        del msg.content[PROTOTYPES_RECORD]
        msg.content[ARRAYS_RECORD] = ArrayRecord(state)
        return msg, protos, style

    def evaluates_now(self, server_round: int) -> bool:
        """Whether this round sends evaluate messages: always with two-messages, after the last one with one-message."""
        return not self.one_message or self.global_round(server_round) == self.cfg.federation.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Flower's evaluate messages with the global prototypes, to every labeled site (never a target)."""
        if not self.evaluates_now(server_round):
            return []  # the next round's train message evaluates this round's model
        messages = super().configure_evaluate(self.global_round(server_round), self._to_wire(arrays), config, grid)
        skipped = self.target_nodes | self.failed_nodes
        messages = self._with_summaries([m for m in messages if m.metadata.dst_node_id not in skipped],
                                        style_bank=False)
        self.evaluate_sent = messages
        self.round_record(server_round).timeline["evaluate-sent"] = time.time()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Scalar averages for the log; pooled histogram, accuracy and prevalence become the ATC reference."""
        if not self.evaluates_now(server_round):
            return None
        record = self.round_record(server_round)
        ok, errors = _split_replies(self._take_reports("evaluate", record, replies), self.evaluate_sent,
                                    self.cfg.federation.round_timeout_s)
        return self._evaluated(record, [msg.content[METRICS_RECORD] for msg in ok], errors)

    def _evaluated(self, record: RoundRecord, site_metrics: list[MetricRecord],
                   errors: list[str]) -> MetricRecord | None:
        """``record``'s evaluate part from the sites' evaluate metrics; pooled, they become the ATC reference."""
        for line in errors:
            self.progress(f"round {record.round} (evaluate): {line}")
        if site_metrics:
            self.source = source_stats(site_metrics)
        metrics = self.evaluate_metrics_aggr_fn([RecordDict({METRICS_RECORD: m}) for m in site_metrics],
                                                self.weighted_by_key) if site_metrics else None
        record.evaluate, record.evaluate_failures = dict(metrics or {}), errors
        record.evaluate_compute_s = [float(m[COMPUTE_SECONDS]) for m in site_metrics]
        return metrics

    def _take_reports(self, kind: str, record: RoundRecord, replies: Iterable[Message]) -> list[Message]:
        """``replies`` with each one's timings moved into ``record``; with one-message, the evaluations that train
        replies bring complete the previous round (its evaluate part, ATC reference, checkpoint and log line), from
        the nodes two-messages would have asked: not targets, nor those whose train reply failed in that round."""
        record.timeline[f"{kind}-received"] = time.time()
        replies = list(replies)
        evaluations: dict[int, MetricRecord] = {}
        for msg in replies:
            if msg.has_error():
                continue
            if TIMINGS_RECORD in msg.content:
                timings = msg.content.pop(TIMINGS_RECORD)
                record.site_timings[f"{kind} node {msg.metadata.src_node_id}"] = {k: float(v) for k, v in
                                                                                    timings.items()}
            if EVALUATION_RECORD in msg.content:
                evaluations[msg.metadata.src_node_id] = msg.content.pop(EVALUATION_RECORD)
        if kind == "train" and self.pending is not None:
            previous, ckpt = self.pending
            self.pending = None
            asked = [m for m in self.train_sent if m.metadata.dst_node_id not in self.failed_nodes | self.target_nodes]
            nodes = {m.metadata.dst_node_id for m in asked}
            ids = {m.metadata.message_id for m in asked if m.metadata.message_id}  # set once Flower sent them
            answers = [msg for msg in replies if msg.metadata.src_node_id in nodes
                       or msg.metadata.reply_to_message_id in ids]
            _, errors = _split_replies(answers, asked, self.cfg.federation.round_timeout_s)
            self._evaluated(previous, [m for node, m in evaluations.items() if node in nodes], errors)
            self._save(previous, dataclasses.replace(ckpt, source=self.source))
        return replies

    def finish_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn`` (after each round's evaluation): checkpoint, round log, progress line; with
        one-message, before the last round, the checkpoint waits for the next round's evaluations."""
        if server_round == 0:
            return None  # Flower also calls it before round 1: nothing new to save
        record = self.round_record(server_round)
        class_totals = [sum(counts) for counts in zip(*record.class_counts.values())]
        ckpt = Checkpoint(self.global_state, self.cfg, list(self.classes),
                          self.prototypes or Prototypes.empty(len(self.classes), self.embedding_dim),
                          self.source, round=record.round, kind="federated",
                          extra={"strategy": self.cfg.method.strategy, "sites": record.sites,
                                 "class_counts": dict(zip(self.classes, class_totals)),
                                 STYLE_BANK_EXTRA: bank_to_arrays(self.style_bank)})
        if not self.evaluates_now(server_round):
            record.wall_s = time.perf_counter() - self._started
            self.pending = (record, ckpt)
            return None
        self._save(record, ckpt)
        return None

    def _save(self, record: RoundRecord, ckpt: Checkpoint) -> None:
        """Round log line, checkpoint and progress line of a finished round (wall time to now unless already set)."""
        record.checkpoint = self.store.round_path(record.round).name
        record.wall_s = record.wall_s or time.perf_counter() - self._started
        self.store.log_round(record)  # before the checkpoint: a crash between them repeats the round on --resume
        self.store.save_round(ckpt)
        self.last_checkpoint = ckpt
        self.progress(_progress_line(record, self.cfg.federation.rounds))


def _progress_line(record: RoundRecord, total_rounds: int) -> str:
    train, evaluate = record.train, record.evaluate
    compute = max(record.train_compute_s or [0.0]) + max(record.evaluate_compute_s or [0.0])
    line = (f"round {record.round}/{total_rounds}: {record.sites} site(s), "
            f"train loss {train.get('loss', float('nan')):.4f} acc {train.get('train-accuracy', float('nan')):.3f}"
            f" | val acc {evaluate.get('val-accuracy', float('nan')):.3f}"
            f" | {record.wall_s:.1f}s (site compute {compute:.1f}s) → {record.checkpoint}")
    failures = record.failures + record.evaluate_failures
    line += f" | {len(failures)} failed reply(ies)" if failures else ""
    line += f" | {len(record.rejected)} rejected reply(ies)" if record.rejected else ""
    return line + (f" | {record.retries} retry(ies)" if record.retries else "")


def build_strategy(cfg: CrossSimConfig, classes: tuple[str, ...], global_state: dict[str, torch.Tensor],
                   store: RunStore, *, num_sites: int, round_offset: int = 0,
                   prototypes: Prototypes | None = None, style_bank: dict[str, StyleEntry] | None = None,
                   progress: Progress = print) -> CrossSimStrategy:
    """The strategy of a run, waiting for ``num_sites`` sites before each round and needing min-sites replies
    (or all ``num_sites`` when there are fewer)."""
    return CrossSimStrategy(
        cfg=cfg, classes=classes, global_state=global_state, store=store, round_offset=round_offset,
        min_replies=min(cfg.federation.min_sites, num_sites),
        prototypes=prototypes, style_bank=style_bank, progress=progress, fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=1.0, min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=num_sites,
        weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS_RECORD, configrecord_key=CONFIG_RECORD,
        train_metrics_aggr_fn=scalar_metrics_average, evaluate_metrics_aggr_fn=scalar_metrics_average)
