"""round-style one-message vs two-messages: the same rounds.jsonl records and checkpoints, fewer messages."""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from test_strategy import TINY, LoopbackGrid, flower_task  # noqa: F401  (flower_task is a fixture)

from crosssim.boundary import COMPUTE_SECONDS, LOAD_SECONDS, ROUND_EVALUATE
from crosssim.checkpoint import load_checkpoint
from crosssim.config import load_config, to_flat
from crosssim.data.sites import LABELS_FILENAME, read_labels_csv, write_labels_csv
from crosssim.data.synth import generate_hospitals
from server.app import ServerSettings, run_federation

ROUNDS = 3
# The same float32 computation in a process whose allocations differ (no evaluate message in between) can round
# differently in the last bit (CPU kernels' vector paths follow the data's alignment): floats agree to this.
FLOAT_RTOL = 1e-5
TIMING_FIELDS = {"train_s", "wall_s", "train_compute_s", "evaluate_compute_s", "load_s", "timeline", "site_timings"}
TIMING_METRICS = {COMPUTE_SECONDS, LOAD_SECONDS}  # also averaged into the records' train and evaluate dicts


def same(a, b) -> bool:
    """Equal in content: integers, strings and shapes exactly, floats to FLOAT_RTOL (NaN equal to NaN),
    dataclasses field by field."""
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        return torch.allclose(a, b, rtol=FLOAT_RTOL, atol=FLOAT_RTOL, equal_nan=True) if a.is_floating_point() \
            else torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and np.allclose(a, b, rtol=FLOAT_RTOL, atol=FLOAT_RTOL, equal_nan=True)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and (math.isclose(a, b, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_RTOL)
                                         or math.isnan(a) and math.isnan(b))
    return a == b


def content(record: dict) -> dict:
    """A rounds.jsonl record without what measures time."""
    kept = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    for key in ("train", "evaluate"):
        kept[key] = {k: v for k, v in kept[key].items() if k not in TIMING_METRICS}
    return kept


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    return generate_hospitals(tmp_path_factory.mktemp("style") / "sites", images_per_site=12,
                              image_size=32).source_sites


def _both_styles(tmp_path, site_dirs, overrides: dict) -> tuple[dict, dict]:
    """The same federation run with each round style: (run folders, grids) by style."""
    runs, grids = {}, {}
    for style in ("two-messages", "one-message"):
        cfg = load_config(None, {**TINY, "rounds": ROUNDS, "round-style": style, **overrides})
        grids[style] = LoopbackGrid(site_dirs, tmp_path / f"cache-{style}")
        runs[style] = tmp_path / style
        assert run_federation(grids[style], ServerSettings(cfg, runs[style], False, len(site_dirs)),
                              lambda _: None) is not None
    return runs, grids


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


def assert_same_records_and_checkpoints(runs: dict) -> None:
    """rounds.jsonl without its timings, and every checkpoint but for the config's round-style, agree."""
    records = {style: _records(run) for style, run in runs.items()}
    assert [r["round"] for r in records["one-message"]] == list(range(1, ROUNDS + 1))
    for one, two in zip(records["one-message"], records["two-messages"], strict=True):
        assert same(content(one), content(two)), one["round"]
    for name in [f"round-{r:04d}.pt" for r in range(1, ROUNDS + 1)] + ["latest.pt", "final.pt"]:
        one, two = (load_checkpoint(runs[style] / name) for style in ("one-message", "two-messages"))
        assert one.source is not None and one.source.count > 0
        flat_one, flat_two = to_flat(one.config), to_flat(two.config)
        assert {k for k in flat_one if flat_one[k] != flat_two[k]} == {"round-style"}
        assert same(one, dataclasses.replace(two, config=one.config)), name


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize("strategy", ["crosssim", "fedbn"])
def test_one_message_rounds_write_the_records_and_checkpoints_of_two_message_rounds(tmp_path, three_sites, strategy):
    runs, grids = _both_styles(tmp_path, three_sites, {"strategy": strategy})

    def kinds(style: str) -> list[str]:
        return [m.metadata.message_type for _, m in grids[style].sent]

    sites = len(three_sites)
    assert kinds("two-messages") == ([MessageType.TRAIN] * sites + [MessageType.EVALUATE] * sites) * ROUNDS
    assert kinds("one-message") == [MessageType.TRAIN] * sites * ROUNDS + [MessageType.EVALUATE] * sites
    asked = [bool(c[ROUND_EVALUATE]) for c in grids["one-message"].train_configs]
    assert asked == [False] * sites + [True] * sites * (ROUNDS - 1)  # round k evaluates round k-1's model
    assert_same_records_and_checkpoints(runs)
    for record in _records(runs["one-message"]):
        assert record["evaluate"]["val-accuracy"] >= 0 and len(record["evaluate_compute_s"]) == sites
        assert {k.split()[0] for k in record["site_timings"]} == ({"train", "evaluate"} if record["round"] == ROUNDS
                                                                 else {"train"})


@pytest.mark.usefixtures("flower_task")
def test_a_site_failing_every_round_leaves_the_same_records_in_both_styles(tmp_path, three_sites):
    bad = shutil.copytree(three_sites[2], tmp_path / "hospital-x")
    rows = list(read_labels_csv(bad / LABELS_FILENAME).items())
    write_labels_csv(bad / LABELS_FILENAME, [(path, "pneumothorax" if i == 0 else label)
                                            for i, (path, label) in enumerate(rows)])
    runs, _ = _both_styles(tmp_path, [*three_sites[:2], bad], {"min-sites": 2})
    assert_same_records_and_checkpoints(runs)
    records = _records(runs["one-message"])
    assert all(len(r["failures"]) == 1 and r["sites"] == 2 and not r["evaluate_failures"] for r in records)
