"""Transplant: every check refuses its kind of bad checkpoint with its own message; good checkpoints (ours
and nanoGPT's) become safetensors + a manifest that rebuild the same model."""

import json
import os
import sys

import pytest
import torch
import yaml
from helpers import tiny_gpt
from pipeline_helpers import ROOT, run, tiny_params_dict, write_corpus
from safetensors import safe_open
from safetensors.torch import load_file

from gptcore import data
from gptcore import tokenizer as tok
from gptcore.checkpoint import save_checkpoint
from gptcore.files import sha256_file
from gptcore.model import GPT
from gptcore.transplant import MANIFEST_FILE, WEIGHTS_FILE, TransplantError, check_weights, transplant

CHECK_NAMES = ["file", "config", "keys", "shapes", "vocab", "finite", "tie"]  # finite first: NaN != NaN


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("transplant")
    write_corpus(root / "corpus.txt")
    data.prepare("corpus.txt", root / "data", 0.1, root=root)
    return root


@pytest.fixture(scope="module")
def vocab_size(root):
    return tok.load(root / "data").vocab_size


def make_model(vocab_size: int, seed: int = 0) -> GPT:
    return tiny_gpt(seed=seed, vocab_size=vocab_size, n_layer=2)


def ours(model: GPT) -> dict:
    """A checkpoint in the shape gptcore/train.py writes."""
    return {
        "model_args": model.config.to_dict(),
        "model": model.state_dict(),
        "optimizer": {},
        "iter_num": 30,
        "best_val_loss": 2.5,
        "params": {"train": {"max_iters": 30}},
        "data_sha256": "abc",
    }


def nanogpt(model: GPT) -> dict:
    """A checkpoint in the shape karpathy/nanoGPT's train.py writes: torch.compile's `_orig_mod.` prefix on
    every key, both tied keys stored, the causal-mask buffers of its slow attention path, the config in
    model_args (its train.py passes these keys), best_val_loss as a tensor."""
    sd = {f"_orig_mod.{k}": v.clone() for k, v in model.state_dict().items()}
    t = model.config.block_size
    for i in range(model.config.n_layer):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(t, t)).view(1, 1, t, t)
    c = model.config
    model_args = dict(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        block_size=c.block_size,
        bias=c.bias,
        vocab_size=c.vocab_size,
        dropout=c.dropout,
    )
    return {
        "model": sd,
        "optimizer": {"state": {}, "param_groups": []},
        "model_args": model_args,
        "iter_num": 250,
        "best_val_loss": torch.tensor(1.4697),
        "config": {"dataset": "shakespeare_char", "batch_size": 64},
    }


def test_our_checkpoint_transplants_with_its_manifest(root, vocab_size, tmp_path):
    model = make_model(vocab_size)
    src = save_checkpoint(ours(model), tmp_path / "ckpt.pt")
    manifest = transplant(src, tmp_path / "cutile", vocab_size, "float32", source_label="out/ckpt.pt")

    weights = tmp_path / "cutile" / WEIGHTS_FILE
    assert json.loads((tmp_path / "cutile" / MANIFEST_FILE).read_text()) == manifest
    assert manifest["format"] == "gptcore-transplant/1"
    assert manifest["source"] == {
        "path": "out/ckpt.pt",
        "sha256": sha256_file(src),
        "format": "gptcore",
        "iter_num": 30,
        "best_val_loss": 2.5,
        "data_sha256": "abc",
    }
    assert manifest["weights"]["sha256"] == sha256_file(weights) and manifest["weights"]["dtype"] == "float32"
    assert manifest["config"] == model.config.to_dict()
    assert manifest["n_params"] == model.num_params(non_embedding=False)
    assert [c["name"] for c in manifest["checks"]] == CHECK_NAMES
    assert all(c["status"] == "pass" for c in manifest["checks"])
    assert manifest["tied"] == ["transformer.wte.weight", "lm_head.weight"] and manifest["created"]

    # The file: the tied embedding stored once, the config in the header, values as in the checkpoint.
    tensors = load_file(str(weights))
    assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors
    with safe_open(str(weights), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == model.config.to_dict()
    # Read back (as verify does), it rebuilds the same model: same logits.
    back = check_weights(tmp_path / "cutile", vocab_size)
    assert back.source_format == "transplant" and back.config == model.config
    rebuilt = GPT(back.config)
    rebuilt.load_state_dict(back.state_dict)
    idx = torch.randint(vocab_size, (2, 16))
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(idx, idx)[0], model(idx, idx)[0], rtol=0, atol=0)


def test_bfloat16_transplant_stores_bfloat16(vocab_size, tmp_path):
    src = save_checkpoint(ours(make_model(vocab_size)), tmp_path / "ckpt.pt")
    manifest = transplant(src, tmp_path / "out", vocab_size, "bfloat16")
    assert manifest["weights"]["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(str(tmp_path / "out" / WEIGHTS_FILE)).values()} == {torch.bfloat16}


def test_nanogpt_checkpoint_transplants(vocab_size, tmp_path):
    model = make_model(vocab_size, seed=1)
    src = tmp_path / "nanogpt_ckpt.pt"
    torch.save(nanogpt(model), src)
    manifest = transplant(src, tmp_path / "cutile", vocab_size)
    assert manifest["source"]["format"] == "nanogpt"
    assert manifest["source"]["iter_num"] == 250
    assert manifest["source"]["best_val_loss"] == pytest.approx(1.4697)
    back = check_weights(tmp_path / "cutile", vocab_size)
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict[name], tensor), name


def corrupt(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def drop_key(ck):
    del ck["model"]["transformer.h.1.ln_2.bias"]


def add_key(ck):
    ck["model"]["transformer.h.0.attn.rotary"] = torch.zeros(3)


def incomplete_config(ck):
    del ck["model_args"]["n_head"]


def no_config(ck):
    del ck["model_args"]


def break_tie(ck):
    ck["model"]["lm_head.weight"] = ck["model"]["lm_head.weight"].clone()
    ck["model"]["lm_head.weight"][3, 5] += 0.5


def non_finite(ck):
    w = ck["model"]["transformer.h.0.mlp.c_fc.weight"]
    w[0, 0], w[1, 1] = float("nan"), float("inf")


def wrong_shape(ck):
    ck["model"]["transformer.wpe.weight"] = ck["model"]["transformer.wpe.weight"][:8].clone()


@pytest.mark.parametrize(
    "edit,on_file,message",
    [
        (None, corrupt, r"not a checkpoint this project can read"),
        (drop_key, None, r"missing parameters: transformer\.h\.1\.ln_2\.bias"),
        (add_key, None, r"unexpected parameters: transformer\.h\.0\.attn\.rotary"),
        (incomplete_config, None, r"model config is incomplete: missing n_head"),
        (no_config, None, r"model config is missing: the checkpoint has no 'model_args'"),
        (break_tie, None, r"weight tying broken: transformer\.wte\.weight and lm_head\.weight differ \(1 of"),
        (non_finite, None, r"non-finite values in 1 tensors: transformer\.h\.0\.mlp\.c_fc\.weight \(1 NaN, 1 inf\)"),
        (wrong_shape, None, r"shape mismatch .*transformer\.wpe\.weight is \(8, 32\), expected \(16, 32\)"),
    ],
    ids=[
        "corrupted",
        "missing-key",
        "unexpected-key",
        "incomplete-config",
        "no-config",
        "broken-tie",
        "non-finite",
        "shape",
    ],
)
def test_bad_checkpoints_are_refused_with_their_own_message(vocab_size, tmp_path, edit, on_file, message):
    ck = ours(make_model(vocab_size))
    ck["model"] = {k: v.clone() for k, v in ck["model"].items()}  # untie: each edit touches one name only
    ck["model"]["lm_head.weight"] = ck["model"]["transformer.wte.weight"]
    if edit:
        edit(ck)
    src = save_checkpoint(ck, tmp_path / "ckpt.pt")
    if on_file:
        on_file(src)
    with pytest.raises(TransplantError, match=message) as err:
        transplant(src, tmp_path / "cutile", vocab_size)
    assert str(src) in str(err.value)  # says where
    assert not (tmp_path / "cutile" / WEIGHTS_FILE).exists()  # and writes nothing


def test_wrong_vocab_is_refused(vocab_size, tmp_path):
    src = save_checkpoint(ours(make_model(vocab_size + 6)), tmp_path / "ckpt.pt")
    with pytest.raises(
        TransplantError,
        match=rf"vocab_size mismatch: the checkpoint's model has {vocab_size + 6} "
        rf"tokens, the prepared data \(data/meta.json\) has {vocab_size}",
    ):
        transplant(src, tmp_path / "cutile", vocab_size, vocab_source="data/meta.json")


def test_missing_file_and_code_in_the_pickle_are_refused(vocab_size, tmp_path):
    with pytest.raises(TransplantError, match="checkpoint not found"):
        check_weights(tmp_path / "nope.pt", vocab_size)

    class Payload:  # unpickling this would run os.system: weights_only loading must refuse it
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    ck = ours(make_model(vocab_size))
    ck["extra"] = Payload()
    torch.save(ck, tmp_path / "evil.pt")
    with pytest.raises(TransplantError, match="not a checkpoint this project can read"):
        check_weights(tmp_path / "evil.pt", vocab_size)
    assert not (tmp_path / "pwned").exists()


def test_weights_changed_after_the_transplant_are_refused(vocab_size, tmp_path):
    src = save_checkpoint(ours(make_model(vocab_size)), tmp_path / "ckpt.pt")
    transplant(src, tmp_path / "cutile", vocab_size)
    weights = tmp_path / "cutile" / WEIGHTS_FILE
    from safetensors.torch import save_file

    tensors = load_file(str(weights))
    with safe_open(str(weights), framework="pt") as f:
        header = f.metadata()
    tensors["transformer.wpe.weight"][0, 0] += 1.0
    save_file(tensors, str(weights), metadata=header)
    with pytest.raises(TransplantError, match="sha256 differs from the one .*manifest.json recorded"):
        check_weights(tmp_path / "cutile", vocab_size)


def stage_project(root, tmp_path, **sections):
    """A folder holding params.yaml and the prepared data, where the stage scripts run without DVC."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data").symlink_to(root / "data")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(**sections)))
    return tmp_path


def stage_env(project):
    return {**os.environ, "PYTHONPATH": str(ROOT), "DVC_ROOT": str(project), "GPTCORE_MLFLOW": "off"}


def test_transplant_stage_writes_metrics_and_stops_cleanly_on_a_bad_checkpoint(root, vocab_size, tmp_path):
    project = stage_project(root, tmp_path, transplant={"source": "ckpt.pt"})
    save_checkpoint(nanogpt(make_model(vocab_size)), project / "ckpt.pt")
    run([sys.executable, str(ROOT / "stages" / "transplant.py")], project, env=stage_env(project))
    metrics = json.loads((project / "metrics" / "transplant.json").read_text())
    manifest = json.loads((project / "cutile" / MANIFEST_FILE).read_text())
    assert manifest["source"]["format"] == "nanogpt" and metrics["checks_passed"] == 7
    assert manifest["weights"]["sha256"] == sha256_file(project / "cutile" / WEIGHTS_FILE)
    assert manifest["source"]["path"] == "ckpt.pt" and manifest["data"]["tokenizer"] == "char"
    from safetensors import safe_open

    with safe_open(str(project / "cutile" / WEIGHTS_FILE), framework="pt") as f:  # the tokenizer travels with it
        assert tok.from_json(f.metadata()["tokenizer"]).vocab_size == vocab_size

    save_checkpoint(ours(make_model(vocab_size + 1)), project / "ckpt.pt")
    out = run([sys.executable, str(ROOT / "stages" / "transplant.py")], project, check=False, env=stage_env(project))
    assert out.returncode == 2, out.stderr
    assert "vocab_size mismatch" in out.stderr and "Traceback" not in out.stderr


def test_dvc_stages_track_the_right_things():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "${transplant.source}" in stages["transplant"]["deps"]  # a new checkpoint reruns transplant onwards
    # a tolerance change reruns verify alone; the other two are the folders it reads
    assert stages["verify"]["params"] == ["verify", "data.out_dir", "transplant.out_dir"]
    assert "${transplant.out_dir}/model.safetensors" in stages["verify"]["deps"]
    assert [next(iter(m)) for m in stages["verify"]["metrics"]] == ["metrics/verify.json"]
    assert [next(iter(o)) for o in stages["verify"]["outs"]] == ["reports/verify.md", "reports/verify.json"]
