"""One error policy for every stage: a problem the user can fix prints one line that names it (the file, the
key, expected and actual) and exits 2, before any output is touched; `--set` and `python -m gptcore` work
for every stage."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import yaml
from pipeline_helpers import tiny_params_dict, write_corpus

from gptcore import data, stage
from gptcore.__main__ import TOOLS
from gptcore.__main__ import main as gptcore_main

STAGES = ["prepare", "train", "transplant", "verify", "bench", "sample"]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder: params.yaml, the prepared tiny corpus, and outputs a previous run left."""
    write_corpus(tmp_path / "corpus.txt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict()))
    data.prepare("corpus.txt", tmp_path / "data", root=tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.json").write_text('{"a previous run": "its manifest"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage(name: str, argv: list[str], capsys) -> tuple[int, str]:
    module = importlib.import_module(f"stages.{name}")
    code = stage.main(lambda: module.main(argv))
    return code, capsys.readouterr().err


def assert_one_line(err: str, *words: str):
    assert "Traceback" not in err and err.startswith("error: "), err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("name", STAGES)
def test_a_yaml_syntax_error_names_the_file_and_line(workspace, capsys, name):
    text = (workspace / "params.yaml").read_text().replace("n_layer: 1", "n_layer: [1", 1)
    (workspace / "params.yaml").write_text(text)
    code, err = run_stage(name, [], capsys)
    assert code == 2
    assert_one_line(err, "params.yaml: not valid YAML at line")
    assert re.search(r"at line \d+, column \d+", err), err


@pytest.mark.parametrize("name", STAGES)
def test_an_empty_params_file_is_refused_by_every_stage(workspace, capsys, name):
    (workspace / "params.yaml").write_text("\n")
    code, err = run_stage(name, [], capsys)
    assert code == 2
    assert_one_line(err, "params.yaml: the file is empty")
    assert (workspace / "out" / "ckpt.json").read_text() == '{"a previous run": "its manifest"}\n'


@pytest.mark.parametrize(
    "setup,argv,words",
    [
        (lambda w: (w / "data" / "train.bin").write_bytes(b"\0\0\0"), [], ["train.bin is not a uint16 token file"]),
        (lambda w: None, ["--set", "train.resume=true"], ["train.resume: true, but", "last.pt does not exist"]),
        (lambda w: None, ["--set", "backend=cutile"], ["backend 'cutile' cannot run"]),
        (lambda w: None, ["--set", "train.lerning_rate=1"], ["train.lerning_rate: unknown key"]),
    ],
    ids=["odd-sized data", "resume without last.pt", "cutile without a GPU", "a typo in --set"],
)
def test_train_refuses_before_touching_any_output(workspace, capsys, setup, argv, words):
    setup(workspace)
    code, err = run_stage("train", argv, capsys)
    assert code == 2
    assert_one_line(err, *words)
    assert sorted(p.name for p in (workspace / "out").iterdir()) == ["ckpt.json"]  # nothing written
    assert (workspace / "out" / "ckpt.json").read_text() == '{"a previous run": "its manifest"}\n'
    assert not (workspace / "metrics").exists()


def test_set_overrides_any_section_and_python_m_gptcore_lists_the_stages(workspace, capsys, monkeypatch):
    monkeypatch.setenv("GPTCORE_MLFLOW", "off")
    code, _ = run_stage("prepare", ["--set", "data.val_fraction=0.2"], capsys)
    assert code == 0
    assert len(data.load_split(workspace / "data", "val")) > 0
    import json

    prepared = json.loads((workspace / "metrics" / "prepare.json").read_text())
    assert prepared["val_tokens"] == prepared["characters"] - int(prepared["characters"] * 0.8)
    assert gptcore_main(["--help"]) == 0
    shown = capsys.readouterr().out
    assert all(f"  {name} " in shown for name in STAGES) and "gptcore.release" in shown
    assert gptcore_main(["trian"]) == 2 and "unknown stage 'trian'" in capsys.readouterr().err


def test_every_listed_tool_runs():
    """`python -m gptcore --help` lists tools: each is a module that answers --help (no GPU needed)."""
    for command in TOOLS:
        module = command.split()[2]
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "usage:" in out.stdout, (module, out.stderr[-500:])
