"""The README's commands work as written: every `crosssim` line parses, and "Your own data" runs end to end."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from crosssim.checkpoint import load_checkpoint
from crosssim.cli import build_parser
from crosssim.cli import main as crosssim_main
from crosssim.data.sites import write_labels_csv

README = Path(__file__).resolve().parent.parent / "README.md"
OWN_DATA_HEADING = "## Your own data"
SIMULATE_OR_DEPLOY = ("simulate", "server", "client")  # run end to end by test_simulate and test_deployment


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)


def crosssim_commands(block: str) -> list[list[str]]:
    """Each `crosssim …` command of a code block as argv (continuations joined, trailing comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        if line.startswith("crosssim "):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end >= 0 else len(text)]


README_COMMANDS = [argv for block in code_blocks(README.read_text()) for argv in crosssim_commands(block)]


def test_the_readme_shows_commands():
    assert len(README_COMMANDS) >= 10


@pytest.mark.parametrize("argv", README_COMMANDS, ids=[" ".join(a[:1]) for a in README_COMMANDS])
def test_every_readme_command_parses(argv):
    build_parser().parse_args(argv)  # argparse exits on an unknown flag or a missing argument


def test_your_own_data_runs_as_written(binary_sites, eval_tiny_run, tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name, site in zip(("hospital-a", "hospital-b", "hospital-c"), binary_sites):
        shutil.copytree(site, data / name)
    shutil.copytree(eval_tiny_run.target_dir, data / "new-hospital")
    truth = [(path, "normal" if label == "normal" else "abnormal")
             for path, label in (line.split(",") for line in eval_tiny_run.target_labels.read_text().split()[1:])]
    write_labels_csv(data / "new-hospital-truth.csv", truth)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CROSSSIM_CACHE_DIR", str(tmp_path / "cache"))
    commands = [argv for block in code_blocks(section(README.read_text(), OWN_DATA_HEADING))
                for argv in crosssim_commands(block)]
    assert [argv[0] for argv in commands] == ["check", "train", "simulate", "evaluate", "evaluate"]
    for argv in commands:
        if argv[0] in SIMULATE_OR_DEPLOY:  # the federation's checkpoint: the pooled one stands in for it here
            (tmp_path / "runs/fed").mkdir(parents=True)
            shutil.copy(tmp_path / "runs/pooled/final.pt", tmp_path / "runs/fed/final.pt")
            continue
        assert crosssim_main(argv) == 0, argv
    assert load_checkpoint(tmp_path / "runs/pooled/final.pt").classes == ["abnormal", "normal"]
    assert (tmp_path / "runs/new-hospital-scored/metrics.json").is_file()
