"""Stages run by hand: the examples in every stage's --help are valid command lines (their --set keys exist,
their usage lines name `python -m gptcore STAGE`), `--out` sends all of a hand run's outputs there and leaves
the pipeline's files alone, and transplanting the same checkpoint twice writes the same bytes."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import struct
import sys

import pytest
import yaml
from helpers import tiny_gpt
from pipeline_helpers import ROOT, digests, env_for, run, tiny_params_dict

from gptcore import stage
from gptcore import tokenizer as tok
from gptcore.__main__ import STAGES
from gptcore.__main__ import main as gptcore_main
from gptcore.checkpoint import save_checkpoint
from gptcore.params import load_params, parse_assignments, with_overrides
from gptcore.transplant import MANIFEST_FILE, WEIGHTS_FILE, transplant

# A command line shown in a help text: `python -m gptcore STAGE ...`, `python -m gptcore.chat ...` or, as
# DVC and torchrun run them, `-m stages.STAGE ...`; the arguments end at a `#` comment.
EXAMPLE = re.compile(r"(?:python -m gptcore (\w+)|-m stages\.(\w+)|python -m (gptcore\.chat))\b([^#\n]*)")
OPTIONAL = re.compile(r"\[(--[^\[\]]*)\]")  # `[--set data.corpus=my.txt]`: an optional part, shown as usage shows it


def help_text(command: str, capsys) -> str:
    """What `python -m gptcore STAGE --help` (or `python -m gptcore.chat --help`) prints."""
    if command == "gptcore.chat":
        with pytest.raises(SystemExit):
            importlib.import_module(command).parse_args(["--help"])
    else:
        assert gptcore_main([command, "--help"]) == 0
    return capsys.readouterr().out


def examples(text: str) -> list[tuple[str, list[str]]]:
    """(the module that runs it, its arguments) of each example command line in a help text."""
    found = []
    for match in EXAMPLE.finditer(text):
        name = match.group(1) or match.group(2)
        module = match.group(3) or f"gptcore.stages.{name}"
        found.append((module, shlex.split(OPTIONAL.sub(r"\1", match.group(4)))))
    return found


@pytest.mark.parametrize("command", [*STAGES, "gptcore.chat"])
def test_every_example_in_a_stages_help_is_a_valid_command_line(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps at the terminal's width: --set and its value may part
    monkeypatch.chdir(ROOT)  # the examples' --params params.yaml is the project's
    text = help_text(command, capsys)
    name = command.rsplit(".", 1)[-1]
    assert text.startswith(f"usage: python -m gptcore{'.' if name == 'chat' else ' '}{name} "), text.splitlines()[0]

    shown = examples(text.split("\n\n", 1)[1])  # after the usage line
    assert shown, f"{command} --help shows no example"
    for module_name, argv in shown:
        module = importlib.import_module(module_name)
        args = module.parse_args(argv)  # an unknown option or a bad value exits here, naming it
        sections = getattr(module, "SECTIONS", [module.SECTION])
        stage.load(args, module.SECTION, sections=sections)  # each --set key and --preset, checked by params.py

    # and every `--set key=value` the text shows, in an option's help too (not the KEY=VALUE placeholder)
    assignments = re.findall(r"--set\s+'?([a-z][\w.]*=[^\s')]+)", OPTIONAL.sub(r"\1", text))
    assert assignments, f"{command} --help shows no --set example"
    section = importlib.import_module(shown[0][0]).SECTION
    with_overrides(load_params(ROOT / "params.yaml"), parse_assignments(assignments, section))


def tiny_checkpoint(path, vocab_size: int):
    model = tiny_gpt(vocab_size=vocab_size)
    return save_checkpoint({"model_args": model.config.to_dict(), "model": model.state_dict(), "iter_num": 1}, path)


def safetensors_metadata_keys(path) -> list[str]:
    """The metadata keys in the order the file's header holds them."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return list(json.loads(f.read(size))["__metadata__"])


@pytest.mark.slow
def test_transplanting_the_same_checkpoint_twice_writes_the_same_bytes(root):
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(transplant={"source": "ckpt.pt"})))
    tiny_checkpoint(root / "ckpt.pt", tok.load(root / "data").vocab_size)
    env = {**env_for(root), "PYTHONPATH": str(ROOT), "GPTCORE_MLFLOW": "off"}
    outputs = ["cutile", "metrics/transplant.json"]
    made = []
    for _ in range(2):  # two processes: safetensors' metadata order changed from one to the next
        run([sys.executable, "-m", "gptcore", "transplant"], root, env=env)
        made.append(digests(root, outputs))
    assert made[0] == made[1] and len(made[0]) == 3  # weights, manifest, metrics: byte for byte
    keys = safetensors_metadata_keys(root / "cutile" / WEIGHTS_FILE)
    assert keys == sorted(keys) and "config" in keys


def test_a_transplant_that_makes_the_same_bytes_keeps_the_manifest_that_names_their_run(root, tmp_path):
    source = tiny_checkpoint(tmp_path / "ckpt.pt", tok.load(root / "data").vocab_size)
    first = transplant(source, tmp_path / "cutile", None, provenance={"mlflow_run_id": "run1"})
    written = digests(tmp_path, ["cutile"])
    again = transplant(source, tmp_path / "cutile", None, provenance={"mlflow_run_id": "run2"})
    assert again == first and again["mlflow_run_id"] == "run1" and digests(tmp_path, ["cutile"]) == written
    other = transplant(source, tmp_path / "cutile", None, "bfloat16", provenance={"mlflow_run_id": "run3"})
    assert other["mlflow_run_id"] == "run3" and json.loads((tmp_path / "cutile" / MANIFEST_FILE).read_text()) == other


@pytest.mark.slow
def test_sample_out_sends_the_whole_run_there_and_leaves_the_pipelines_files_alone(root, tmp_path_factory):
    project = root
    (project / "params.yaml").write_text(
        yaml.safe_dump(tiny_params_dict(sample={"checkpoint": "ckpt.pt", "num_samples": 1, "max_new_tokens": 10}))
    )
    tiny_checkpoint(project / "ckpt.pt", tok.load(project / "data").vocab_size)
    env = {**env_for(project), "PYTHONPATH": str(ROOT), "GPTCORE_MLFLOW": "off"}
    run([sys.executable, "-m", "gptcore", "sample"], project, env=env)  # the pipeline's outputs
    pipeline = digests(project, ["samples", "metrics"])
    assert set(pipeline) == {"samples/samples.txt", "metrics/sample.json"}

    out = tmp_path_factory.mktemp("elsewhere") / "x"
    shown = run([sys.executable, "-m", "gptcore", "sample", "--out", str(out), "--seed", "7"], project, env=env)
    assert digests(project, ["samples", "metrics"]) == pipeline  # not a byte of the pipeline's changed
    assert out.read_text().startswith("==> sample 1 of 1 <==")
    metrics = json.loads(out.with_name("x.metrics.json").read_text())
    assert metrics["tokens_generated"] == 10 and f"metrics {out}.metrics.json" in shown.stdout
