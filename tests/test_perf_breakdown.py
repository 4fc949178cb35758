"""benchmarks/perf.py's deployment round breakdown: phases from the instants in rounds.jsonl, summing to the wall."""

import pytest

from benchmarks.perf import ROUND_PHASES, metrics_overhead, round_breakdown
from benchmarks.run_all import deployment_table
from crosssim.boundary import TIMING_EVENTS

SENT_AT = 1000.0


def _site(start: float, step: float) -> dict[str, float]:
    """A site's instants: the first at ``start``, then one every ``step`` seconds, in TIMING_EVENTS order."""
    return {name: start + i * step for i, name in enumerate(TIMING_EVENTS)}


def test_a_round_splits_along_the_site_the_server_waited_for_and_sums_to_its_wall():
    slow, fast = _site(SENT_AT + 2.0, 1.0), _site(SENT_AT + 1.0, 0.5)  # slow packs its reply last
    received = slow[TIMING_EVENTS[-1]] + 1.5
    record = {"wall_s": received - SENT_AT + 0.25, "timeline": {"train-sent": SENT_AT, "train-received": received},
              "site_timings": {"train node 1": fast, "train node 2": slow}}
    phases = round_breakdown(record)
    assert sum(phases[p] for p in ROUND_PHASES) == pytest.approx(record["wall_s"])
    assert phases["message delivery wait"] == pytest.approx(2.0)  # the slow site's, not the fast one's 1.0
    assert phases["compute"] == pytest.approx(1.0) == phases["site compute (slowest)"]
    assert phases["reply transport"] == pytest.approx(2.5)  # compute done → packed (1 s) → received (1.5 s)
    assert phases["server: aggregation + checkpoint"] == pytest.approx(0.25)
    assert phases["overhead (wall − slowest compute)"] == pytest.approx(record["wall_s"] - 1.0)


def test_the_results_table_shows_every_phase_before_and_after():
    record = {"wall_s": 10.0, "timeline": {"train-sent": SENT_AT, "train-received": SENT_AT + 9.0},
              "site_timings": {"train node 1": _site(SENT_AT + 1.0, 1.0)}}
    run = {"rounds": [round_breakdown(record)], "mean": round_breakdown(record), "messages_per_site": 2}
    lines = deployment_table({"before": run, "after": {**run, "messages_per_site": 1}, "images_per_site": 24})
    assert sum(line.startswith(f"| {phase} |") for phase in ROUND_PHASES for line in lines) == len(ROUND_PHASES)
    assert "| messages per site, whole run | 2 | 1 | 0.50 |" in lines


def test_overhead_from_metrics_needs_no_timestamps_and_takes_the_slowest_site_of_each_kind():
    records = [{"wall_s": 10.0, "train_compute_s": [2.0, 3.0], "evaluate_compute_s": [0.5, 1.0]},
               {"wall_s": 8.0, "train_compute_s": [1.0, 1.0], "evaluate_compute_s": []}]
    figures = metrics_overhead(records)
    assert figures["wall"] == pytest.approx(9.0)
    assert figures["site compute (slowest)"] == pytest.approx((4.0 + 1.0) / 2)
    assert figures["overhead (wall − slowest compute)"] == pytest.approx(9.0 - 2.5)


def test_the_results_table_sets_after_against_the_baseline_commit():
    record = {"wall_s": 10.0, "timeline": {"train-sent": SENT_AT, "train-received": SENT_AT + 9.0},
              "site_timings": {"train node 1": _site(SENT_AT + 1.0, 1.0)}}
    figures = {"wall": 20.0, "site compute (slowest)": 4.0, "overhead (wall − slowest compute)": 16.0}
    run = {"rounds": [round_breakdown(record)], "mean": round_breakdown(record), "messages_per_site": 2,
           "from_metrics": figures}
    after = {**run, "messages_per_site": 1, "from_metrics": {**figures, "overhead (wall − slowest compute)": 4.0}}
    baseline = {"rounds": [], "mean": {}, "messages_per_site": 4,
                "from_metrics": {**figures, "overhead (wall − slowest compute)": 32.0}}
    lines = deployment_table({"before": run, "after": after, "baseline": baseline, "baseline_commit": "abc1234"})
    assert "| overhead (wall − slowest compute) | 32.00 | 16.00 | 4.00 | 0.12 |" in lines
    assert "| messages per site, whole run | 4 | 2 | 1 | 0.25 |" in lines
    assert "| overhead (wall − slowest compute), mean of every run | 32.00 | 16.00 | 4.00 | 0.12 |" in lines
    baseline["repeats"] = [baseline, {"from_metrics": {"overhead (wall − slowest compute)": 16.0}}]
    lines = deployment_table({"before": run, "after": after, "baseline": baseline, "baseline_commit": "abc1234"})
    assert "| overhead (wall − slowest compute), mean of every run | 24.00 | 16.00 | 4.00 | 0.17 |" in lines
