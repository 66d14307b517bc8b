"""Transplant: check a checkpoint thoroughly, then write the cuTile model's weights as safetensors.

The source is any checkpoint the reference model can hold: ours (`out/ckpt.pt` of the train stage), a
`ckpt.pt` written by karpathy/nanoGPT's train.py (`_orig_mod.` prefixes, config in `model_args`, both
tied keys stored), or an earlier transplant (`model.safetensors`, config in its header). Each check
either passes or raises a TransplantError that says what is wrong and where:

    file      the file exists and loads without executing code (weights_only torch.load, or safetensors)
    config    `model_args` is present and complete
    keys      no parameter missing, none unexpected (listed by name)
    shapes    every tensor has the shape the config implies
    vocab     the config's vocab_size is the prepared data's (meta.json)
    finite    no NaN or inf anywhere
    tie       transformer.wte.weight and lm_head.weight are equal (one tensor in the model)

The output is `<out_dir>/model.safetensors` (the tied embedding stored once; the config, as JSON, in the
file's header so the file alone is enough to rebuild the model) and `<out_dir>/manifest.json` (where the
weights came from, the config, the checks that ran).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gptcore.checkpoint import CheckpointError, check_finite, clean_state_dict, load_checkpoint
from gptcore.devices import DTYPES
from gptcore.errors import DataError, UserError
from gptcore.files import atomic_write, atomic_write_text, sha256_file
from gptcore.manifest import find_manifest, verify_checkpoint
from gptcore.model import GPT, GPTConfig
from gptcore.tokenizer import check_vocab, for_checkpoint

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = "gptcore-transplant/1"
EMBEDDING, LM_HEAD = "transformer.wte.weight", "lm_head.weight"  # one tensor in the model (weight tying)


class TransplantError(UserError, ValueError):
    """A checkpoint that cannot be transplanted; the message names the file, the check and the culprits."""


@dataclass
class Check:
    name: str
    status: str  # "pass" or "skipped" (a failed check raises instead)
    detail: str


@dataclass
class CheckedWeights:
    """A checkpoint that passed every check: its config, its full state dict (both tied names present,
    float tensors as stored) and where it came from."""

    config: GPTConfig
    state_dict: dict[str, torch.Tensor]
    source: Path
    source_sha256: str
    source_format: str  # "gptcore" | "nanogpt" | "transplant" | "torch"
    checks: list[Check] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # iter_num, best_val_loss, data_sha256 when the source has them
    tokenizer: str | None = None  # the tokenizer (JSON) that travels with the weights, when the source has one

    def n_params(self) -> int:
        """Parameters of the model (the tied embedding counted once), as GPT.num_params(False)."""
        return sum(t.numel() for name, t in self.state_dict.items() if name != LM_HEAD)


def _names(names, limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the model the config describes, with its shape. Built on the meta device:
    no memory, no initialisation cost, also for GPT-2-sized configs."""
    with torch.device("meta"):
        model = GPT(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# ---- reading a source -------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict, dict, dict]:
    """(model_args, state_dict, header) of a transplant's safetensors file; the header carries the config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    # The manifest beside the file (manifest.json, or <stem>.json beside a renamed copy) records its sha256:
    # weights changed since then are refused before they are read, naming the file and both hashes.
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        raise TransplantError(str(e)) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupted file
        raise TransplantError(f"{path}: cannot be read as safetensors: {type(e).__name__}: {e}") from None
    if "config" not in header:
        raise TransplantError(
            f"{path}: the safetensors header has no 'config' (not written by the transplant "
            "stage); verify the torch checkpoint it came from instead"
        )
    try:
        model_args = json.loads(header["config"])
    except json.JSONDecodeError as e:
        raise TransplantError(f"{path}: the 'config' in the safetensors header is not JSON: {e}") from None
    # The file stores the tied embedding once; the model has it under both names.
    if header.get("tied") == f"{LM_HEAD}={EMBEDDING}" and LM_HEAD not in tensors and EMBEDDING in tensors:
        tensors[LM_HEAD] = tensors[EMBEDDING]
    return model_args, tensors, header


def read_source(path: str | Path) -> tuple[dict, dict, str, dict, str | None]:
    """(model_args, raw state dict, format, info, tokenizer JSON or None) from a torch checkpoint or a
    transplant's safetensors. Never executes code from the file. A directory means the transplant's
    model.safetensors in it."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise TransplantError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        model_args, tensors, header = _read_safetensors(path)
        return model_args, tensors, "transplant", {}, header.get("tokenizer")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise TransplantError(str(e)) from None
    if not isinstance(ckpt.get("model"), dict):
        raise TransplantError(f"{path}: no 'model' state dict in the checkpoint (it has: {_names(ckpt)})")
    if "model_args" not in ckpt:
        raise TransplantError(
            f"{path}: model config is missing: the checkpoint has no 'model_args' (it has: {_names(ckpt)})"
        )
    fmt = "gptcore" if "params" in ckpt else "nanogpt" if "config" in ckpt else "torch"
    info = {}
    for key in ("iter_num", "best_val_loss", "data_sha256"):
        value = ckpt.get(key)
        if isinstance(value, torch.Tensor) and value.numel() == 1:  # nanoGPT stores best_val_loss as a tensor
            value = value.item()
        if isinstance(value, (int, float, str)):
            info[key] = value
    tokenizer = ckpt.get("tokenizer") if isinstance(ckpt.get("tokenizer"), str) else None
    return ckpt["model_args"], ckpt["model"], fmt, info, tokenizer


# ---- the checks -------------------------------------------------------------------------------------------


def check_weights(path: str | Path, vocab_size: int | None, vocab_source: str = "meta.json") -> CheckedWeights:
    """Read `path` and run every check; raise TransplantError at the first that fails.

    `vocab_size` is the prepared data's vocabulary (None: the tokenizer the checkpoint carries, if it does;
    else the check is skipped, said so in the result)."""
    path = Path(path)
    model_args, raw, fmt, info, tokenizer = read_source(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    checks = [Check("file", "pass", f"{fmt} checkpoint, {len(raw)} tensors, loaded without executing code")]

    if not isinstance(model_args, dict):
        raise TransplantError(f"{file}: model config ('model_args') is a {type(model_args).__name__}, not a dict")
    try:
        config = GPTConfig.from_dict(dict(model_args))
    except (ValueError, TypeError) as e:
        raise TransplantError(f"{file}: {e}") from None
    checks.append(Check("config", "pass", ", ".join(f"{k}={v}" for k, v in config.to_dict().items())))

    sd = clean_state_dict(raw)
    not_tensors = [name for name, t in sd.items() if not isinstance(t, torch.Tensor)]
    if not_tensors:
        raise TransplantError(f"{file}: state dict entries that are not tensors: {_names(not_tensors)}")
    shapes = expected_shapes(config)
    missing, unexpected = set(shapes) - set(sd), set(sd) - set(shapes)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing parameters: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected parameters: {_names(unexpected)}")
        raise TransplantError(
            f"{file}: state dict does not match the config ({config.n_layer} layers): " + "; ".join(parts)
        )
    checks.append(Check("keys", "pass", f"all {len(shapes)} parameters present, none unexpected"))

    wrong = [
        f"{name} is {tuple(sd[name].shape)}, expected {shape}"
        for name, shape in shapes.items()
        if tuple(sd[name].shape) != shape
    ]
    if wrong:
        raise TransplantError(
            f"{file}: shape mismatch with the config (n_embd={config.n_embd}, "
            f"block_size={config.block_size}, vocab_size={config.vocab_size}): "
            + "; ".join(wrong[:8])
            + (f"; and {len(wrong) - 8} more" if len(wrong) > 8 else "")
        )
    checks.append(Check("shapes", "pass", "every tensor has the shape the config implies"))

    try:
        if vocab_size is not None:  # the prepared data's, which the manifest records
            check_vocab(file, config.vocab_size, vocab_size, f"the prepared data ({vocab_source})")
            checks.append(Check("vocab", "pass", f"vocab_size {vocab_size} = {vocab_source}"))
        elif tokenizer is not None:
            for_checkpoint(file, config.vocab_size, tokenizer)
            checks.append(Check("vocab", "pass", f"vocab_size {config.vocab_size} = the tokenizer it carries"))
        else:
            checks.append(Check("vocab", "skipped", "no prepared data given to compare with"))
    except (CheckpointError, DataError) as e:
        raise TransplantError(str(e)) from None

    # Before the tie: NaN compares unequal to itself, so a NaN in the embedding would read as a broken tie.
    try:
        check_finite(sd, file)
    except CheckpointError as e:
        raise TransplantError(str(e)) from None
    checks.append(Check("finite", "pass", "no NaN or inf"))

    emb, head = sd[EMBEDDING], sd[LM_HEAD]
    if not torch.equal(emb, head):
        diff = (emb.float() - head.float()).abs()
        raise TransplantError(
            f"{file}: weight tying broken: {EMBEDDING} and {LM_HEAD} differ "
            f"({int((diff > 0).sum())} of {diff.numel()} values, max abs diff "
            f"{diff.max().item():.3g}); the model holds one tensor for both"
        )
    checks.append(Check("tie", "pass", f"{EMBEDDING} == {LM_HEAD}"))

    return CheckedWeights(
        config=config,
        state_dict=sd,
        source=file,
        source_sha256=sha256_file(file),
        source_format=fmt,
        checks=checks,
        info=info,
        tokenizer=tokenizer,
    )


# ---- writing the transplant -------------------------------------------------------------------------------


def save_weights(weights: CheckedWeights, path: Path, dtype: torch.dtype, tokenizer: str | None = None) -> Path:
    """The state dict as safetensors in `dtype`, the tied embedding stored once, the config and the
    tokenizer (the checkpoint's own, else `tokenizer`) in the header: the file alone decodes."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(dtype).contiguous() for name, t in weights.state_dict.items() if name != LM_HEAD}
    header = {
        "format": FORMAT,
        "config": json.dumps(weights.config.to_dict()),
        "tied": f"{LM_HEAD}={EMBEDDING}",
        "source_sha256": weights.source_sha256,
    }
    if weights.tokenizer or tokenizer:
        header["tokenizer"] = weights.tokenizer or tokenizer

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=header)
        sort_metadata(tmp)

    return atomic_write(path, write)


def sort_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its metadata in key order, in place. safetensors keeps the
    metadata in a Rust HashMap, whose order changes from run to run: unsorted, the same weights would make
    different bytes each time (a new sha256, and DVC would rerun every stage after transplant)."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # the same content, so the same length unless the JSON escapes differ
            raise TransplantError(f"{path}: the sorted safetensors header is {len(text)} bytes, not {size}")
        f.seek(8)
        f.write(text.ljust(size))  # padded with spaces, as safetensors pads its header


def transplant(
    source: str | Path,
    out_dir: str | Path,
    vocab_size: int | None,
    dtype: str = "float32",
    vocab_source: str = "meta.json",
    source_label: str | None = None,
    provenance: dict | None = None,
    data: dict | None = None,
    tokenizer: str | None = None,
) -> dict:
    """Check `source`, write `<out_dir>/model.safetensors` and `<out_dir>/manifest.json`; return the manifest
    (the one already there when it records the same bytes: then its run, time and seconds are the earlier's).
    `source_label` is the path recorded in the manifest (the stage gives it relative to the repo);
    `provenance` (the stage's mlflow_run_id, git_commit, dvc_stage) goes into the manifest as it is, and so
    does `data` (the corpus it was trained on: what re-verifying a fetched copy needs). `tokenizer`: the
    prepared data's (JSON), for a source that carries none (a nanoGPT checkpoint)."""
    if dtype not in DTYPES:
        raise TransplantError(f"transplant.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    weights = check_weights(source, vocab_size, vocab_source)
    out_dir = Path(out_dir)
    weights_path = save_weights(weights, out_dir / WEIGHTS_FILE, DTYPES[dtype], tokenizer)
    manifest = {
        "format": FORMAT,
        "source": {
            "path": source_label or str(source),
            "sha256": weights.source_sha256,
            "format": weights.source_format,
            **weights.info,
        },
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": sha256_file(weights_path),
            "dtype": dtype,
            "bytes": weights_path.stat().st_size,
        },
        "config": weights.config.to_dict(),
        "n_params": weights.n_params(),
        "tied": [EMBEDDING, LM_HEAD],
        "checks": [asdict(c) for c in weights.checks],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 3),
        **(provenance or {}),
        **(data or {}),
    }
    # the MLflow run and commit that made the source, from its own manifest (out/ckpt.json) when it has one
    made_by = find_manifest(weights.source)
    if made_by:
        manifest["source"].update({k: made_by.data[k] for k in ("mlflow_run_id", "git_commit") if k in made_by.data})
    path = out_dir / MANIFEST_FILE
    earlier = earlier_manifest(path, manifest, volatile=["created", "seconds", *(provenance or {})])
    if earlier is not None:
        return earlier
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return manifest


def earlier_manifest(path: Path, manifest: dict, volatile: list[str]) -> dict | None:
    """The manifest at `path` when it records these same weights from the same source, checked alike (it
    differs from `manifest` only in the `volatile` keys: when and by which run), else None. Kept as it is, a
    transplant that made the same bytes again changes no file, so DVC does not rerun verify after it."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # none yet, or unreadable: written anew

    def lasting(m: dict) -> dict:
        return {k: v for k, v in m.items() if k not in volatile}

    return earlier if isinstance(earlier, dict) and lasting(earlier) == lasting(manifest) else None
