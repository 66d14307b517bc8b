"""The ahead-of-time compile gate: the cuTile kernels compiled to cubins, without a GPU.

It runs on any machine with `cuda-tile[tileiras]` installed, so a CPU-only run of the verify stage (and
CI) still proves the kernels compile, while the levels that need a GPU are skipped.

Scope `model` compiles the signatures the levels run this checkpoint with: the three attention kernels at
its head dim in `verify.model_dtype` (forward, and the two backward kernels L5 and training need), the
attention forward in `verify.decode_dtype` (L4), the LayerNorm forward and backward at its width in
float32 (autocast hands LayerNorm the fp32 residual stream) and in `verify.model_dtype`. Scope `all` runs
every signature of `gptcore.kernels.compile` (results/cpu/compile-gate.csv times each one, cold).

Passing results are cached under ~/.cache/gptcore/compile-gate (or $GPTCORE_CACHE_DIR), keyed by the
kernel sources, the compiler packages' versions and the job list: rerunning verify after a tolerance
change does not recompile unchanged kernels. The report says when a result came from the cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from gptcore.environment import package_version
from gptcore.files import atomic_write_text
from gptcore.model import GPTConfig
from gptcore.verify.common import FAIL, PASS, SKIPPED, Result

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"
TITLE = "ahead-of-time compile gate"
COLUMNS = ["arch", "kernel", "signature", "seconds", "status"]


def cache_dir() -> Path:
    if os.environ.get("GPTCORE_CACHE_DIR"):
        return Path(os.environ["GPTCORE_CACHE_DIR"]) / "compile-gate"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptcore" / "compile-gate"


def model_jobs(config: GPTConfig, model_dtype: str, decode_dtype: str, archs: list[str], dropout: bool = False):
    """The CompileJobs of the signatures the levels run this model with: attention forward and backward in
    model_dtype, forward in decode_dtype (and the forward's long-sequence block order where the block size
    reaches it); LayerNorm forward, backward and the weight/bias column sums in float32 (autocast) and in
    model_dtype (a model cast to it); each also with the aligned ("16B") signature where the model's sizes
    give it. `dropout`: the three attention kernels in model_dtype with dropout on the probabilities too
    (training, L1's dropout cases)."""
    from gptcore.kernels import attention
    from gptcore.kernels.compile import CompileJob, aligned_variants

    head_dim = config.n_embd // config.n_head
    # compile.py has LayerNorm signatures with weight and bias, or neither; a bias=False model's LayerNorm
    # (weight, no bias) is closest to the affine one.
    wanted = [
        ("attention.fwd", model_dtype),
        ("attention.bwd_dq", model_dtype),
        ("attention.bwd_dkdv", model_dtype),
        ("attention.fwd", decode_dtype),
    ]
    wanted += [
        (kernel, dtype)
        for dtype in ("float32", model_dtype)
        for kernel in ("layernorm.fwd", "layernorm.bwd", "layernorm.colsum")
    ]
    # Training-shaped tensors (block_size tokens, widths multiples of 16) launch the aligned "16B" signature,
    # other shapes (sampled prompts) the plain one: both where the model's sizes allow the aligned one.
    attn_variants = aligned_variants(head_dim, config.block_size)
    ln_variants = aligned_variants(config.n_embd)
    jobs = []
    for arch in archs:
        tiles = attention.tiles_for(arch, head_dim)
        long_order = tiles.fwd_order(config.block_size) != tiles.fwd_sched  # full-block sequences take another order
        for kernel, dtype in dict.fromkeys(wanted):  # dedupe, keep the order
            if kernel.startswith("attention.") and dtype == "float32":
                continue  # no fp32 attention kernel: the levels would report that themselves
            if kernel.startswith("attention."):
                size, variants = head_dim, attn_variants
            else:
                size, variants = (0 if kernel == "layernorm.colsum" else config.n_embd), ln_variants
            for aligned in variants:
                jobs.append(CompileJob(kernel, arch, dtype, size, aligned=aligned))
                if kernel == "attention.fwd" and long_order:
                    jobs.append(CompileJob(kernel, arch, dtype, size, long=True, aligned=aligned))
                if dropout and kernel.startswith("attention.") and dtype == model_dtype:
                    jobs.append(CompileJob(kernel, arch, dtype, size, dropout=True, aligned=aligned))
        jobs += fused_model_jobs(config, model_dtype, arch, dropout)
    return jobs


def fused_model_jobs(config: GPTConfig, model_dtype: str, arch: str, dropout: bool) -> list:
    """The fused forward's kernels (gptcore/fused_forward.py) as this model runs them in model_dtype: each residual
    LayerNorm variant (with dropout too when `dropout`), bias + GELU at 4 x n_embd, cross-entropy over the
    vocabulary (and the fused LM head's kernel for a large one), the column sums."""
    from gptcore.kernels.compile import ADL_BWD_VARIANTS, ADL_FWD_VARIANTS, CompileJob, aligned_variants
    from gptcore.kernels.linear_cross_entropy import FUSED_MIN_VOCAB

    if model_dtype not in ("bfloat16", "float16"):
        return []  # the fused forward runs its matmuls in half precision only
    n, jobs = config.n_embd, []
    for kernel, variants in (
        ("residual_layernorm.fwd", ADL_FWD_VARIANTS),
        ("residual_layernorm.bwd", ADL_BWD_VARIANTS),
    ):
        for variant in variants:
            for p in (False, True) if dropout else (False,):
                jobs += [
                    CompileJob(kernel, arch, model_dtype, n, p, aligned=a, variant=variant[0])
                    for a in aligned_variants(n)
                ]
    for kernel, size in (("bias_gelu.fwd", 4 * n), ("bias_gelu.bwd", 4 * n)):
        jobs += [CompileJob(kernel, arch, model_dtype, size, aligned=a) for a in aligned_variants(size)]
    size = config.vocab_size
    for kernel in ("cross_entropy.fwd", "cross_entropy.bwd"):
        jobs += [CompileJob(kernel, arch, model_dtype, size, aligned=a) for a in aligned_variants(size)]
    if size >= FUSED_MIN_VOCAB:  # training fuses the LM head and its loss
        jobs += [
            CompileJob("linear_cross_entropy.grad", arch, model_dtype, size, aligned=a) for a in aligned_variants(size)
        ]
    return jobs + [CompileJob("column_sums", arch, "float32", 0)]


def cache_key(labels: list[str]) -> str:
    """Changes with any kernel source, the compiler packages' versions or the job list."""
    h = hashlib.sha256()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in ("cuda-tile", "nvidia-cuda-tileiras", "nvidia-cuda-nvcc", "nvidia-nvvm"):
        h.update(f"{dist}={package_version(dist)}\0".encode())
    h.update(json.dumps(labels).encode())
    return h.hexdigest()[:32]


def error_summary(traceback_text: str, limit: int = 300) -> str:
    """The exception line of a traceback and the compiler's message after it, on one line (the very last
    line of a cuda.tile compiler error is often just "Unknown location")."""
    lines = traceback_text.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line[:1].isalpha() and ("Error" in line or "Exception" in line)]
    tail = lines[starts[-1] :] if starts else lines[-1:]
    return " ".join(line.strip() for line in tail if line.strip() != "Unknown location")[:limit]


def run(
    config: GPTConfig,
    archs: list[str],
    scope: str,
    model_dtype: str,
    decode_dtype: str,
    workers: int | None = None,
    dropout: bool = False,
) -> Result:
    result = Result("compile", f"{TITLE} ({scope} signatures)", columns=COLUMNS)
    if not archs:
        result.status, result.reason = SKIPPED, "switched off (verify.compile_archs is empty)"
        return result
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.tile") is None:
        result.fail("cuda.tile is not installed (pip install 'cuda-tile[tileiras]'): the kernels cannot be compiled")
        return result
    from gptcore.kernels.compile import compile_one
    from gptcore.kernels.compile import jobs as all_jobs

    t0 = time.perf_counter()
    todo = model_jobs(config, model_dtype, decode_dtype, archs, dropout) if scope == "model" else all_jobs(archs)
    labels = [f"{j.arch} {j.kernel} {j.label}" for j in todo]
    cached = cache_dir() / f"{cache_key(labels)}.json"
    from_cache = cached.is_file()
    if from_cache:
        rows = json.loads(cached.read_text())["rows"]
        result.notes.append(
            f"Compiled earlier with the same kernel sources and cuda.tile version (cache {cached}); not recompiled."
        )
    else:
        workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
        # spawn, not fork: this process has torch loaded, and forking it with threads running can hang
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_one, todo))
        rows = [
            {
                "arch": r.arch,
                "kernel": r.kernel,
                "signature": r.label,
                "seconds": round(r.seconds, 1),
                "status": PASS if r.ok else f"{FAIL}: {error_summary(r.error)}",
            }
            for r in results
        ]
        if all(r["status"] == PASS for r in rows):  # only passes are cached: a failure is looked at anew
            atomic_write_text(cached, json.dumps({"labels": labels, "rows": rows, "created": time.strftime("%F %T")}))
    result.rows = rows
    failed = [r for r in rows if r["status"] != PASS]
    result.figures = {
        "jobs": len(rows),
        "failed": len(failed),
        "archs": ",".join(archs),
        "scope": scope,
        "cached": from_cache,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if failed:
        f = failed[0]
        result.fail(
            f"{len(failed)} of {len(rows)} kernels failed to compile; first: {f['arch']} {f['kernel']} "
            f"{f['signature']}: {f['status'].removeprefix('fail: ')}"
        )
    return result
