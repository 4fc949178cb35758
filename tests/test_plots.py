"""benchmarks/plots.py: the RESULTS.md figures, drawn from small hand-made results documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib import image

from benchmarks import accuracy as acc
from benchmarks import plots, run_all

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def figures(accuracy: float, estimate: float | None) -> dict[str, Any]:
    return {"accuracy": accuracy, "balanced_accuracy": accuracy, "atc_estimated_accuracy": estimate,
            "atc_abs_error": None if estimate is None else abs(estimate - accuracy)}


def accuracy_doc(suite: str) -> dict[str, Any]:
    """Two seeds of fedavg and crosssim, plain and AdaBN; seed 1's crosssim has no ATC estimate."""
    runs = {seed: {"fedavg": {"figures": {"none": figures(0.5 + d, 0.6), "adabn": figures(0.6 + d, 0.62)}},
                   "crosssim": {"figures": {"none": figures(0.55 + d, 0.5 if seed == "0" else None),
                                            "adabn": figures(0.65 + d, 0.7)}}}
            for seed, d in (("0", 0.0), ("1", 0.02))}
    return {"suite": suite, "protocol": {"name": "quick"}, "runs": runs}


def few_shot_doc(suite: str) -> dict[str, Any]:
    def row(k: int, seed: int) -> dict[str, Any]:
        return {"few_shot_accuracy": 0.5 + 0.02 * k + 0.01 * seed, "label_free_accuracy": 0.55 + 0.01 * seed}

    return {"suite": suite, "shots": [1, 5], "runs": {
        str(seed): {m: {"figures": {str(k): row(k, seed) for k in (1, 5)}} for m in ("fedavg", "crosssim")}
        for seed in (0, 1)}}


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


@pytest.mark.parametrize(("plot", "docs"), [
    (plots.plot_accuracy, [accuracy_doc("synthetic"), accuracy_doc("digits")]),
    (plots.plot_few_shot, [few_shot_doc("synthetic"), few_shot_doc("digits")]),
    (plots.plot_estimate_vs_truth, [accuracy_doc("synthetic"), accuracy_doc("digits")])])
def test_each_figure_writes_a_png_and_the_same_bytes_again(tmp_path: Path, plot, docs) -> None:
    first, second = tmp_path / "a" / "figure.png", tmp_path / "b" / "figure.png"
    assert plot(docs, first) and plot(docs, second)
    assert_png(first)
    assert first.read_bytes() == second.read_bytes()  # no date or version in the file


@pytest.mark.parametrize(("plot", "docs"), [
    (plots.plot_accuracy, [{"suite": "synthetic", "runs": {}}]),
    (plots.plot_few_shot, [{"suite": "synthetic", "shots": [1], "runs": {}}]),
    (plots.plot_estimate_vs_truth, [{"suite": "synthetic", "runs": {"0": {"oracle": {"figures": {
        "none": figures(0.5, None)}}}}}])])
def test_a_figure_without_data_writes_nothing(tmp_path: Path, plot, docs) -> None:
    assert not plot(docs, tmp_path / "figure.png") and not plot([], tmp_path / "figure.png")
    assert not (tmp_path / "figure.png").exists()


def test_estimate_points_are_the_runs_with_both_figures() -> None:
    points = plots.estimate_points(accuracy_doc("synthetic"))
    assert len(points) == 7  # 2 seeds × 2 methods × 2 adaptations, less seed 1's plain crosssim
    assert (0.55, 0.5) in points


def test_write_plots_names_what_it_wrote_and_removes_a_stale_figure(tmp_path: Path) -> None:
    names = plots.write_plots([accuracy_doc("synthetic")], [few_shot_doc("synthetic")], tmp_path)
    assert names == [plots.ACCURACY_PLOT, plots.FEW_SHOT_PLOT, plots.ESTIMATE_PLOT]
    for name in names:
        assert_png(tmp_path / name)
    assert plots.write_plots([accuracy_doc("synthetic")], [], tmp_path) == [plots.ACCURACY_PLOT,
                                                                             plots.ESTIMATE_PLOT]
    assert not (tmp_path / plots.FEW_SHOT_PLOT).exists()


def test_regenerated_figures_do_not_mark_the_tree_dirty() -> None:
    assert f"benchmarks/{plots.FIGURES_FOLDER}" in acc.RESULT_PATHS


def test_results_md_links_exactly_the_plots_it_is_given() -> None:
    docs, few = [accuracy_doc("synthetic")], [few_shot_doc("synthetic")]
    common = {"few_shot_docs": few, "generated": "now", "commit": {"commit": None, "dirty": None}}
    links = {plots.ACCURACY_PLOT: "](figures/accuracy.png)", plots.FEW_SHOT_PLOT: "](figures/few-shot.png)",
             plots.ESTIMATE_PLOT: "](figures/estimate-vs-truth.png)"}
    assert "![" not in run_all.render_results_md(docs, **common)
    for given in ([plots.FEW_SHOT_PLOT], [plots.ACCURACY_PLOT, plots.ESTIMATE_PLOT], list(links)):
        text = run_all.render_results_md(docs, plots=given, **common)
        assert text.count("![") == len(given)
        assert all((link in text) == (name in given) for name, link in links.items())


def test_write_results_md_writes_the_figures_beside_it(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "accuracy-synthetic.json").write_text(json.dumps(accuracy_doc("synthetic")))
    out = run_all.write_results_md(results, tmp_path / "RESULTS.md", generated="now",
                                   commit={"commit": None, "dirty": None})
    assert_png(tmp_path / plots.ACCURACY_PLOT)
    assert not (tmp_path / plots.FEW_SHOT_PLOT).exists()
    assert "](figures/accuracy.png)" in out.read_text() and "few-shot.png" not in out.read_text()
