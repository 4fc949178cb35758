"""benchmarks/few_shot.py: k shots per class drawn from the target's labels, scored side by side with auto."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import few_shot
from crosssim.data.sites import read_labels_csv
from tests.bench_fakes import TARGET, fake_sites


def test_draw_shots_takes_k_per_class_and_is_seeded() -> None:
    labels = dict(TARGET)
    rows = few_shot.draw_shots(labels, 2, seed=0)
    assert sorted(label for _, label in rows) == ["a", "a", "b", "b"]
    assert all(labels[path] == label for path, label in rows)
    assert rows == few_shot.draw_shots(labels, 2, seed=0)
    assert len(few_shot.draw_shots(labels, 10, seed=0)) == len(TARGET)  # a class gives all it has


class FakeEvaluate:
    """Stands in for ``crosssim.cli.main`` evaluate: few-shot accuracy grows with the shots it was given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], log: Path) -> None:
        self.calls.append(argv)
        shots = read_labels_csv(Path(argv[argv.index("--shots") + 1]))
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"few_shot": {
            "n_shots": len(shots), "n_scored": len(TARGET) - len(shots), "label_free_method": "adabn",
            "label_free_accuracy": 0.5, "few_shot_accuracy": 0.5 + 0.1 * len(shots),
            "deployed": "few-shot" if len(shots) > 2 else "label-free",
            "deployed_accuracy": 0.5 + 0.1 * len(shots) if len(shots) > 2 else 0.5}}))


def test_only_existing_checkpoints_are_adapted_and_the_table_compares_side_by_side(tmp_path: Path) -> None:
    work = tmp_path / "work"
    checkpoint = work / "quick" / "runs" / "fake" / "seed-0" / "crosssim" / "train" / "final.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("stand-in")
    fake = FakeEvaluate()
    doc = few_shot.run_few_shot("fake", [0], ["fedavg", "crosssim"], [1, 2], work, tmp_path / "results",
                                crosssim=fake, prepare=lambda name, out, **_: fake_sites(Path(out) / name))
    assert len(fake.calls) == 2 and all("--adapt" in c and "auto" in c for c in fake.calls)
    assert doc["missing"] and "fedavg" in doc["missing"][0]  # counted and shown, never silently dropped
    assert doc["runs"]["0"]["crosssim"]["figures"]["2"]["few_shot_accuracy"] == 0.5 + 0.1 * 4
    table = few_shot.few_shot_table(doc)
    assert "| fake | crosssim | 2 | 1 | 0.900 ± 0.000 | 0.500 ± 0.000 | 0.900 ± 0.000 | 1 of 1 |" in table
    assert "| fake | crosssim | 1 | 1 | 0.700 ± 0.000 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0 of 1 |" in table
    assert (tmp_path / "results" / "few-shot-fake.json").is_file()


def test_a_later_run_replaces_only_the_k_it_measures(tmp_path: Path) -> None:
    work = tmp_path / "work"
    checkpoint = work / "quick" / "runs" / "fake" / "seed-0" / "crosssim" / "train" / "final.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_text("stand-in")
    prepare = lambda name, out, **_: fake_sites(Path(out) / name)  # noqa: E731
    few_shot.run_few_shot("fake", [0], ["crosssim"], [1, 2], work, tmp_path / "results", crosssim=FakeEvaluate(),
                          prepare=prepare)
    path = tmp_path / "results" / "few-shot-fake.json"
    first = json.loads(path.read_text())["runs"]["0"]["crosssim"]["figures"]

    class Lower(FakeEvaluate):  # the second run's k = 2 figures differ from the first's
        def __call__(self, argv: list[str], log: Path) -> None:
            super().__call__(argv, log)
            out = Path(argv[argv.index("--out") + 1]) / "metrics.json"
            metrics = json.loads(out.read_text())
            metrics["few_shot"]["few_shot_accuracy"] = 0.1
            out.write_text(json.dumps(metrics))

    doc = few_shot.run_few_shot("fake", [0], ["crosssim"], [2], work, tmp_path / "results", crosssim=Lower(),
                                prepare=prepare)
    record = json.loads(path.read_text())["runs"]["0"]["crosssim"]
    assert doc["shots"] == [1, 2] and record["figures"]["1"] == first["1"]
    assert record["figures"]["2"]["few_shot_accuracy"] == 0.1 and record["code"] == doc["code"]
