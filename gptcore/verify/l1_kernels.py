"""L1: each kernel against the PyTorch functional reference, forward and gradients.

The reference runs in float64 on the same (low-precision) inputs, so the error measured is the
candidate's own. Cases, per dtype of `verify.dtypes`:
- attention: every length of `verify.seq_lens` plus the block size, at the model's (heads, head dim) and
  at head dim 64 for each of `verify.widths`; scores scaled to ~1e4 (the softmax saturates: one key takes
  each row); T = 1 (a single visible key); one query against a full cache (decoding; forward only, as the
  kernels' backward needs Tq == Tk).
- LayerNorm: the same lengths at each width with random weights (not 1) and biases (not 0); the
  checkpoint's own LayerNorm weights; inputs with a mean of 20 (variance cancellation). Also in float32:
  under autocast the model's LayerNorms see the fp32 residual stream.
- the decode step's kernels (`decode_cases`, forward only): each sublayer's linear chain at the model's width and
  GPT-2's LM head, at 1 and 64 rows; attention of one new token over caches of the model's block and GPT-2's (one
  split and several), at the first, a middle and the last position, its k and v written into the cache.
- the fused forward's kernels (`fused_cases`): residual add + dropout + LayerNorm (a block's at each width and
  length with every dropout p, the embeddings' and the final one's), bias + GELU, cross-entropy over the model's
  vocabulary and GPT-2's, the fused LM head + cross-entropy (GPT-2's and the character vocabulary, several
  chunks of rows); with dropout the reference applies the kernels' own mask.
The "torch" columns are PyTorch's own op (SDPA, F.layer_norm) in the same dtype against the same
reference: what rounding alone costs. A figure passes when it is within the dtype's tolerance, or within
TORCH_SLACK times PyTorch's own error on the same inputs: saturated softmax inputs (scores ~1e4) make the
key gradient ill-conditioned in half precision, and there no kernel in that dtype can meet a fixed bound;
the candidate must then be no worse than PyTorch by more than that factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptcore.devices import DTYPES
from gptcore.kernels.dropout import dropout_keep_mask
from gptcore.model import GPTConfig, causal_attention_reference
from gptcore.verify.common import (
    PASS,
    Candidate,
    Result,
    scaled_max,
    torch_attention,
    torch_layer_norm,
    within,
)

BATCH = 2
EPS = 1e-5
TITLE = "kernels vs the PyTorch functional reference (float64)"
COLUMNS = [
    "kernel",
    "dtype",
    "shape",
    "T",
    "case",
    "fwd err",
    "grad err",
    "worst grad",
    "torch fwd err",
    "torch grad err",
    "status",
]
TORCH_SLACK = 2.0  # a candidate may be up to this many times PyTorch's own error in the same dtype


def layer_norm_reference(x, weight, bias):
    bias = bias.double() if bias is not None else None
    return F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias, EPS)


def sdpa(q, k, v):
    """PyTorch's fused attention; its causal mask is top-left aligned, so a single query (decoding against a
    cache) runs unmasked, which is the same thing: the last position sees every key."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(-2) == k.size(-2) and q.size(-2) > 1)


def compare(
    ref_fn: Callable, cand_fn: Callable, inputs: dict, backward: bool, grad_names=None
) -> tuple[float, float, str]:
    """Both functions take a dict of named tensors and return a tensor or a tuple of them. The candidate gets
    the inputs as they are, the reference float64 copies of the floating-point ones; with `backward`, both get
    the same upstream gradient of every output, and the inputs in `grad_names` (default: every floating-point
    one) are compared. Returns (worst fwd err over the outputs, worst input-gradient err, its name)."""
    names = [n for n, t in inputs.items() if t.is_floating_point()] if grad_names is None else list(grad_names)
    leaves = {n: t.detach().clone().requires_grad_(backward and n in names) for n, t in inputs.items()}
    ref_leaves = {
        n: (t.detach().double() if t.is_floating_point() else t.detach()).requires_grad_(backward and n in names)
        for n, t in inputs.items()
    }
    with torch.set_grad_enabled(backward):
        outs, refs = _as_tuple(cand_fn(leaves)), _as_tuple(ref_fn(ref_leaves))
    fwd = max(scaled_max(r, o) for r, o in zip(refs, outs))
    if not backward:
        return fwd, float("nan"), ""
    dys = [
        torch.randn(o.shape, generator=torch.Generator().manual_seed(o.numel() + i)).to(o.device, o.dtype)
        for i, o in enumerate(outs)
    ]
    torch.autograd.backward(outs, dys)
    torch.autograd.backward(refs, [dy.double() for dy in dys])
    errs = {
        f"d{n}": scaled_max(ref_leaves[n].grad, leaves[n].grad) if leaves[n].grad is not None else math.nan
        for n in names
    }
    worst = max(errs, key=lambda n: math.inf if math.isnan(errs[n]) else errs[n])
    return fwd, errs[worst], worst


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def attention_cases(
    config: GPTConfig, seq_lens: list[int], widths: list[int], dropouts: list[float] = ()
) -> list[tuple[int, int, int, str, float]]:
    """(heads, head dim, T, case, dropout p) to run in each dtype: with dropout at the model's shape."""
    model_shape = (config.n_head, config.n_embd // config.n_head)
    shapes = [model_shape] + [(w // 64, 64) for w in widths if w % 64 == 0]
    cases = []
    for h, d in dict.fromkeys(shapes):  # dedupe, keep the order
        cases += [(h, d, t, "single key" if t == 1 else "causal", 0.0) for t in seq_lens]
        cases += [(h, d, config.block_size, "scores ~1e4", 0.0), (h, d, config.block_size, "decode: 1 query", 0.0)]
    for p in sorted(set(dropouts) - {0.0}):
        cases += [(*model_shape, t, f"dropout {p:g}", p) for t in seq_lens]
    return cases


def layer_norm_cases(config: GPTConfig, state_dict: dict, seq_lens: list[int], widths: list[int]):
    """(width, T, case, weight, bias, x mean) to run in each dtype; weight None: random weight and bias."""
    cases = [(n, t, "random weights", None, None, 1.0) for n in widths for t in seq_lens]
    for name in sorted(k for k in state_dict if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))):
        module = name.removesuffix(".weight")
        cases.append(
            (
                config.n_embd,
                config.block_size,
                module.removeprefix("transformer."),
                state_dict[name],
                state_dict.get(module + ".bias"),
                1.0,
            )
        )
    cases.append((config.n_embd, config.block_size, "random weights, x mean 20", None, None, 20.0))
    return cases


def run(cand: Candidate, config: GPTConfig, state_dict: dict, vp, device: torch.device) -> Result:
    result = Result("L1", TITLE, columns=COLUMNS)
    seq_lens = sorted(set(vp.seq_lens) | {config.block_size})
    widths = sorted(set(vp.widths) | {config.n_embd})
    gen = torch.Generator().manual_seed(vp.seed)

    def randn(*shape, scale=1.0, mean=0.0):  # drawn on the CPU: the same inputs on every device
        return (torch.randn(*shape, generator=gen) * scale + mean).to(device)

    def attention(t, p=0.0, rng=None):
        if p > 0:
            return cand.attention(t["q"], t["k"], t["v"], dropout_p=p, rng=rng)
        return cand.attention(t["q"], t["k"], t["v"])

    def attention_ref(t, p=0.0, rng=None):
        keep = None
        if p > 0:  # the candidate's own mask for these keys: the reference drops the same probabilities
            b, h, tq, _ = t["q"].shape
            keep = dropout_keep_mask(rng, b, h, tq, t["k"].shape[2], p).to(t["q"].device)
        return causal_attention_reference(t["q"].double(), t["k"].double(), t["v"].double(), keep, p)

    def attention_torch(t, p=0.0, rng=None):
        """PyTorch in the inputs' dtype: SDPA, or with dropout the hand-written attention with the same mask."""
        if p > 0:
            return torch_attention(t["q"], t["k"], t["v"], p, rng)
        return sdpa(t["q"], t["k"], t["v"])

    def layer_norm(t):
        return cand.layer_norm(t["x"], t["weight"], t.get("bias"), EPS)

    def layer_norm_ref(t):
        return layer_norm_reference(t["x"], t["weight"], t.get("bias"))

    for dname in vp.dtypes:
        dtype, tol = DTYPES[dname], getattr(vp.tolerances, dname)
        for h, d, t, case, p in attention_cases(config, seq_lens, widths, vp.dropouts):
            scale = 100.0 if case == "scores ~1e4" else 1.0  # q.k / sqrt(D) then has a std of scale**2
            tq = 1 if case.startswith("decode") else t
            inputs = {
                "q": randn(BATCH, h, tq, d, scale=scale).to(dtype),
                "k": randn(BATCH, h, t, d, scale=scale).to(dtype),
                "v": randn(BATCH, h, t, d).to(dtype),
            }
            row = {
                "kernel": "attention",
                "dtype": dname,
                "shape": f"H={h} D={d}",
                "T": t if tq == t else f"1 of {t}",
                "case": case,
            }
            rng = torch.randint(0, 2**62, (2,), generator=gen).to(device) if p > 0 else None  # the call's keys
            result.rows.append(
                measure(
                    row,
                    lambda: compare(
                        lambda x: attention_ref(x, p, rng), lambda x: attention(x, p, rng), inputs, backward=tq == t
                    ),
                    lambda: compare(
                        lambda x: attention_ref(x, p, rng),
                        lambda x: attention_torch(x, p, rng),
                        inputs,
                        backward=tq == t,
                    ),
                    tol,
                )
            )

    for dname in ["float32"] + list(vp.dtypes):
        dtype, tol = DTYPES[dname], getattr(vp.tolerances, dname)
        for n, t, case, weight, bias, mean in layer_norm_cases(config, state_dict, seq_lens, widths):
            inputs = {"x": randn(BATCH, t, n, scale=2.0, mean=mean).to(dtype)}
            if weight is None:  # random affine parameters: a weight of 1 or a bias of 0 would hide mistakes
                inputs["weight"] = randn(n, scale=0.5, mean=1.0).to(dtype)
                if config.bias:
                    inputs["bias"] = randn(n, scale=0.5).to(dtype)
            else:
                inputs["weight"] = weight.to(device, dtype)
                if bias is not None:
                    inputs["bias"] = bias.to(device, dtype)
            row = {"kernel": "layer_norm", "dtype": dname, "shape": f"N={n}", "T": t, "case": case}
            result.rows.append(
                measure(
                    row,
                    lambda: compare(layer_norm_ref, layer_norm, inputs, backward=True),
                    lambda: compare(
                        layer_norm_ref,
                        lambda t: torch_layer_norm(t["x"], t["weight"], t.get("bias"), EPS),
                        inputs,
                        backward=True,
                    ),
                    tol,
                )
            )

    for dname in vp.dtypes:
        dtype, tol = DTYPES[dname], getattr(vp.tolerances, dname)
        for kernel, size, t, case, p in fused_cases(config, seq_lens, widths, vp.dropouts):
            rng = torch.randint(0, 2**62, (2,), generator=gen).to(device) if p > 0 else None
            inputs, cand_fn, ref_fn, grads = fused_case(cand, kernel, size, t, case, p, rng, dtype, randn, gen)
            row = {"kernel": kernel, "dtype": dname, "shape": f"{SIZE_NAMES[kernel]}={size}", "T": t, "case": case}
            # the reference is plain PyTorch: on the inputs as they are (not upcast) it is the "torch" baseline
            result.rows.append(
                measure(
                    row,
                    lambda: compare(ref_fn, cand_fn, inputs, backward=True, grad_names=grads),
                    lambda: compare(ref_fn, ref_fn, inputs, backward=True, grad_names=grads),
                    tol,
                )
            )

    result.tolerance = {
        f"{d}.{k}": getattr(getattr(vp.tolerances, d), k)
        for d in ["float32"] + list(vp.dtypes)
        for k in ("kernel_fwd", "kernel_grad")
    }
    for dname in vp.dtypes:
        dtype, tol = DTYPES[dname], getattr(vp.tolerances, dname)
        for kernel, shape, t, case, make in decode_cases(config):
            inputs, cand_fn, ref_fn = make(cand, dtype, randn)
            row = {"kernel": kernel, "dtype": dname, "shape": shape, "T": t, "case": case}
            result.rows.append(
                measure(
                    row,
                    lambda: compare(ref_fn, cand_fn, inputs, backward=False),
                    lambda: compare(ref_fn, ref_fn, inputs, backward=False),
                    tol,
                )
            )

    for kernel in ("attention", "layer_norm", *FUSED_KERNELS, *DECODE_KERNELS):
        rows = [r for r in result.rows if r["kernel"] == kernel]
        failed = [r for r in rows if r["status"] != PASS]
        result.figures.update(
            {
                f"{kernel}.cases": len(rows),
                f"{kernel}.failed": len(failed),
                f"{kernel}.fwd_err_max": max(
                    (r["fwd err"] for r in rows if isinstance(r["fwd err"], float)), default=math.nan
                ),
                f"{kernel}.grad_err_max": max(
                    (r["grad err"] for r in rows if isinstance(r["grad err"], float) and not math.isnan(r["grad err"])),
                    default=math.nan,
                ),
            }
        )
        if failed:
            first = failed[0]
            result.fail(
                f"{kernel}: {len(failed)} of {len(rows)} cases out of tolerance; first: {first['dtype']} "
                f"{first['shape']} T={first['T']} {first['case']}: {first['status']}"
            )
    return result


# ---- the fused forward's kernels ----------------------------------------------------------------------------

FUSED_KERNELS = ("residual_layer_norm", "bias_gelu", "cross_entropy", "linear_cross_entropy")
SIZE_NAMES = {"residual_layer_norm": "N", "bias_gelu": "F", "cross_entropy": "V", "linear_cross_entropy": "V"}
GPT2_VOCAB = 50304  # GPT-2's padded BPE rows: the cross-entropy's chunked vocabulary loop
CHAR_VOCAB = 65  # the character presets' rows
HEAD_CHUNK_ROWS = 200  # the fused LM head's cases in chunks of this many rows: several, the last one ragged


def fused_cases(config: GPTConfig, seq_lens: list[int], widths: list[int], dropouts: list[float]):
    """(kernel, size, T, case, dropout p) of the fused forward's kernels, run in each dtype: the residual LayerNorm
    of a block at each width and length, without and with each dropout p; the embeddings' (dropout of an fp32
    sum, no residual) and the final one's (no residual gradient) at the model's width; bias + GELU at each 4 x
    width; cross-entropy over the model's vocabulary and GPT-2's (lengths up to 257), some targets ignored; the fused
    LM head + cross-entropy at the model's width over GPT-2's vocabulary, the character one and the model's, in
    chunks of HEAD_CHUNK_ROWS rows (lengths up to 257)."""
    ps = [0.0] + sorted(set(dropouts) - {0.0})
    cases = []
    for n in widths:
        cases += [
            ("residual_layer_norm", n, t, "block" + (f", dropout {p:g}" if p else ""), p) for t in seq_lens for p in ps
        ]
        cases += [("bias_gelu", 4 * n, t, "random bias", 0.0) for t in seq_lens]
    p = ps[-1]
    for variant in ("embedding", "final"):
        cases += [
            ("residual_layer_norm", config.n_embd, t, variant + (f", dropout {p:g}" if p else ""), p) for t in seq_lens
        ]
    for vocab in dict.fromkeys([config.vocab_size, GPT2_VOCAB]):
        lengths = seq_lens if vocab == config.vocab_size else [t for t in seq_lens if t <= 257]
        cases += [("cross_entropy", vocab, t, "targets, some ignored", 0.0) for t in lengths]
    short = [t for t in seq_lens if t <= 257]
    for vocab in dict.fromkeys([GPT2_VOCAB, CHAR_VOCAB, config.vocab_size]):
        case = f"C={config.n_embd}, chunks of {HEAD_CHUNK_ROWS} rows, targets, some ignored"
        cases += [("linear_cross_entropy", vocab, t, case, 0.0) for t in short]
    return cases


def fused_case(cand: Candidate, kernel: str, size: int, t: int, case: str, p: float, rng, dtype, randn, gen):
    """(inputs, candidate fn, reference fn, names of the inputs whose gradients are compared) of one case. The
    residual stream, biases and LayerNorm parameters are fp32 (as the model trains); activations in `dtype`."""
    if kernel == "residual_layer_norm":
        variant = case.split(",")[0]
        inputs = {
            "branch": randn(BATCH, t, size).to(torch.float32 if variant == "embedding" else dtype),
            "weight": randn(size, scale=0.5, mean=1.0),
            "bias": randn(size, scale=0.5),
        }
        if variant != "embedding":
            inputs.update(x=randn(BATCH, t, size, scale=2.0), branch_bias=randn(size, scale=0.5))

        def run(fn, tensors, out_dtype):
            x_out, y = fn(
                tensors.get("x"), tensors["branch"], tensors.get("branch_bias"), tensors["weight"], tensors["bias"],
                p=p, eps=EPS, out_dtype=out_dtype, rng=rng,
            )  # fmt: skip
            return y if variant == "final" else (x_out, y)  # the final x_out feeds nothing

        return (
            inputs,
            lambda x: run(cand.residual_layer_norm, x, dtype),
            lambda x: run(_reference(kernel), x, None),
            None,
        )
    if kernel == "bias_gelu":
        inputs = {"u": randn(BATCH * t, size, scale=2.0).to(dtype), "bias": randn(size, scale=0.5)}
        return (
            inputs,
            lambda x: cand.bias_gelu(x["u"], x["bias"]),
            lambda x: _reference(kernel)(x["u"], x["bias"]),
            None,
        )
    targets = torch.randint(size, (BATCH, t), generator=gen)
    targets[:, 2::5] = -1  # ignore_index rows (none at T = 1: an all-ignored batch has a NaN mean, as in torch)
    if kernel == "linear_cross_entropy":  # h in dtype, the head's weight fp32 (as the model trains it)
        c = int(case.split(",")[0].removeprefix("C="))
        inputs = {"h": randn(BATCH, t, c).to(dtype), "weight": randn(size, c, scale=0.5), "targets": targets}
        inputs["targets"] = targets.to(inputs["h"].device)
        return (
            inputs,
            lambda x: cand.linear_cross_entropy(x["h"], x["weight"], x["targets"], rows=HEAD_CHUNK_ROWS),
            lambda x: _reference(kernel)(x["h"], x["weight"], x["targets"]),
            ["h", "weight"],
        )
    inputs = {"logits": randn(BATCH, t, size, scale=3.0).to(dtype), "targets": targets.to(randn(1).device)}
    return (
        inputs,
        lambda x: cand.cross_entropy(x["logits"], x["targets"]),
        lambda x: _reference(kernel)(x["logits"], x["targets"]),
        ["logits"],
    )


# ---- the decode step's kernels ------------------------------------------------------------------------------

DECODE_KERNELS = ("decode_linear", "decode_attention")
DECODE_LINEAR_SHAPES = {"qkv": (1, 3), "proj": (1, 1), "fc": (1, 4), "mproj": (4, 1)}  # (K, N) in widths


def decode_cases(config: GPTConfig):
    """(kernel, shape, rows or cache, case, make) of the decode step's kernels; make(cand, dtype, randn) gives
    (inputs, candidate fn, reference fn). Every tensor in the case's dtype, as in a cast model."""
    cases = []
    c = config.n_embd
    linear_shapes = [(c, v) for v in DECODE_LINEAR_SHAPES] + [(c, "head"), (768, "head")]
    for width, variant in dict.fromkeys(linear_shapes):
        k_mult, n_mult = DECODE_LINEAR_SHAPES.get(variant, (1, None))
        k = k_mult * width
        n = n_mult * width if n_mult else (config.vocab_size if width == c else GPT2_VOCAB)
        for rows in (1, 64):
            case = {"qkv": "LayerNorm, bias", "fc": "LayerNorm, bias, GELU", "head": "LayerNorm, no bias"}.get(
                variant, "bias, residual"
            )
            cases.append(
                ("decode_linear", f"K={k} N={n}", rows, f"{variant}: {case}", _linear_case(variant, rows, k, n))
            )
    hd = c // config.n_head
    for heads, head_dim, length in dict.fromkeys([(config.n_head, hd, config.block_size), (12, 64, 1024)]):
        for pos in dict.fromkeys([0, length // 2 - 3, length - 1]):
            for batch in (1, BATCH):
                shape = f"H={heads} D={head_dim} L={length}"
                case = f"new token at {pos}"
                cases.append(
                    (
                        "decode_attention",
                        shape,
                        f"B={batch}",
                        case,
                        _attention_case(batch, heads, head_dim, length, pos),
                    )
                )
    return cases


def _linear_case(variant: str, rows: int, k: int, n: int):
    def make(cand, dtype, randn):
        inputs = {"x": randn(rows, k, scale=2.0, mean=0.5).to(dtype), "weight": randn(n, k, scale=k**-0.5).to(dtype)}
        if variant != "head":
            inputs["bias"] = randn(n, scale=0.5).to(dtype)
        if variant in ("qkv", "fc", "head"):
            inputs.update(ln_weight=randn(k, scale=0.5, mean=1.0).to(dtype), ln_bias=randn(k, scale=0.5).to(dtype))
        if variant in ("proj", "mproj"):
            inputs["residual"] = randn(rows, n, scale=2.0).to(dtype)

        def run(fn):
            return lambda x: fn(
                x["x"], x["weight"], x.get("bias"), x.get("ln_weight"), x.get("ln_bias"), x.get("residual"),
                EPS, variant == "fc",
            )  # fmt: skip

        return inputs, run(cand.decode_linear), run(_reference("decode_linear"))

    return make


def _attention_case(batch: int, heads: int, head_dim: int, length: int, pos: int):
    def make(cand, dtype, randn):
        inputs = {
            "qkv": randn(batch, 3 * heads * head_dim).to(dtype),
            "k_cache": randn(batch, heads, length, head_dim).to(dtype),
            "v_cache": randn(batch, heads, length, head_dim).to(dtype),
        }

        def run(fn):
            def call(x):
                k_cache, v_cache = x["k_cache"].clone(), x["v_cache"].clone()  # written at pos: the outputs too
                out = fn(x["qkv"], k_cache, v_cache, pos, heads)
                return out, k_cache[:, :, pos], v_cache[:, :, pos]

            return call

        return inputs, run(cand.decode_attention), run(_reference("decode_attention"))

    return make


def _reference(kernel: str):
    from gptcore.verify import common

    return getattr(common, f"{kernel}_reference")


def measure(row: dict, compare_fn, baseline_fn, tol) -> dict:
    """The row with its figures and status: `compare_fn` measures the candidate, `baseline_fn` PyTorch's own
    op in the same dtype (both return (fwd err, grad err, worst gradient)). A candidate that raises fails
    its case, with the message."""
    try:
        fwd, grad, worst = compare_fn()
    except Exception as e:  # noqa: BLE001 - any error of the kernel is a finding to report, not a crash
        message = str(e).splitlines()[0] if str(e) else ""
        return {
            **row,
            "fwd err": "-",
            "grad err": "-",
            "worst grad": "",
            "torch fwd err": "-",
            "torch grad err": "-",
            "status": f"fail: {type(e).__name__}: {message}",
        }
    try:
        torch_fwd, torch_grad, _ = baseline_fn()
    except RuntimeError:  # PyTorch has no such op for that dtype on this device: no baseline, no allowance
        torch_fwd = torch_grad = math.nan

    def ok(err: float, bound: float, torch_err: float) -> bool:
        return within(err, bound) or (not math.isnan(torch_err) and within(err, TORCH_SLACK * torch_err))

    bad = []
    if not ok(fwd, tol.kernel_fwd, torch_fwd):
        bad.append(f"fwd {fwd:.3g} > {tol.kernel_fwd:g} and > {TORCH_SLACK:g} x torch {torch_fwd:.3g}")
    if worst and not ok(grad, tol.kernel_grad, torch_grad):
        bad.append(f"{worst} {grad:.3g} > {tol.kernel_grad:g} and > {TORCH_SLACK:g} x torch {torch_grad:.3g}")
    return {
        **row,
        "fwd err": fwd,
        "grad err": grad,
        "worst grad": worst,
        "torch fwd err": torch_fwd,
        "torch grad err": torch_grad,
        "status": "fail: " + ", ".join(bad) if bad else PASS,
    }
