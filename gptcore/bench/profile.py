"""Where a training step's time goes: torch.profiler's kernel times of one eager step, grouped by what each
kernel does (matmul, LayerNorm, attention, casts and copies, ...), per backend, with the matmuls' TFLOP/s
and the step's model FLOPs utilisation (MFU). This is the table the fusion work is measured against.

On a GPU the figures are the GPU time of each kernel (cuTile kernels included); on a CPU, the self time of
each ATen operator, which shows the same split of the work with CPU costs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType

from gptcore.bench.timing import synchronize
from gptcore.model import GPTConfig

# Categories in the order they are tried: the first whose pattern finds a match in the kernel's name wins,
# so the specific ones (a copy kernel is an elementwise kernel too) come before the general ones.
CATEGORIES: list[tuple[str, str]] = [
    ("optimizer", r"multi_tensor_apply|adam|_foreach"),  # AdamW and the gradient clipping's norms
    # our kernels, SDPA's, and SDPA's math path on a CPU; on a GPU the only softmax is the loss's
    ("attention", r"attn_(fwd|bwd)|flash|fmha|attention|safe_softmax|aten::_softmax|aten::softmax$"),
    ("cross-entropy", r"softmax|nll_loss|cross_entropy|ce_(fwd|bwd|grad)_kernel"),
    # the fused residual add + dropout + LayerNorm (adl_*) counts as LayerNorm: it is the LayerNorm pass
    ("layernorm", r"ln_(fwd|bwd|colsum)|layer_?norm|GammaBeta|adl_(fwd|bwd)_kernel"),
    ("matmul", r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitk|aten::(mm|addmm|bmm|matmul)$"),
    ("dropout", r"dropout|bernoulli|philox"),
    ("embedding", r"embedding|index_select|indexselect|index_add|indexFuncLargeIndex|segment|compute_grad_weight"),
    ("gelu", r"gelu"),
    ("casts and copies", r"copy|cast|aten::to$|convert|CatArrayBatched|aten::cat$|aten::clone$"),
    ("reductions", r"reduce_kernel|aten::sum$|aten::mean$|aten::norm$|vector_norm|colsum_kernel"),
    ("elementwise", r"elementwise|add|mul|aten::(fill_|zero_|div|sub|where|masked_fill|sqrt|lerp)"),
]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]

# Dense bf16 matrix peaks by the vendor's datasheets (TFLOP/s), the denominator of MFU, by device name.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4)]


def category(kernel: str) -> str:
    """What a kernel (or, on a CPU, an ATen operator) does, by its name."""
    for name, pattern in _COMPILED:
        if pattern.search(kernel):
            return name
    return "other"


def bf16_peak_tflops(device_name: str) -> float | None:
    for part, tflops in BF16_PEAK_TFLOPS:
        if part in device_name:
            return tflops
    return None


@dataclass
class StepFlops:
    """Model FLOPs of one training step (forward and backward: 3x the forward's), as nanoGPT's MFU counts
    them: 6 per parameter of the matrix products per token, and 12 * layers * width * T per token for the
    attention (the full T x T scores, though causal kernels compute half)."""

    matmul: float
    attention: float

    @property
    def total(self) -> float:
        return self.matmul + self.attention

    @classmethod
    def of(cls, config: GPTConfig, batch: int) -> StepFlops:
        tokens = batch * config.block_size
        c, n_layer = config.n_embd, config.n_layer
        # per layer: qkv (3c^2), projection (c^2), MLP (8c^2); the LM head: c x vocab
        matmul_params = n_layer * 12 * c * c + c * config.vocab_size
        attention = 12 * n_layer * c * config.block_size * tokens
        return cls(matmul=6 * matmul_params * tokens, attention=attention)


def kernel_times(step: Callable[[], object], device: torch.device, steps: int = 3) -> dict[str, dict]:
    """Per kernel name: milliseconds per step and launches per step, over `steps` profiled steps after two
    unprofiled ones (compilation, autotuning, allocator)."""
    for _ in range(2):
        step()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    kernels = {}
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False):
            continue  # a range on the GPU timeline (Optimizer.step#AdamW.step), not a kernel: its kernels count
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            us = event.self_cpu_time_total
        if us > 0:
            kernels[event.key] = {"ms": us / 1000 / steps, "count": event.count / steps}
    return kernels


def top_kernels(kernels: dict[str, dict], count: int = 40) -> list[dict]:
    """The `count` kernels that take the most time per step: name (cut to 120 characters), category, ms, launches."""
    ranked = sorted(kernels.items(), key=lambda item: -item[1]["ms"])[:count]
    return [{"name": name[:120], "category": category(name), "ms": k["ms"], "count": k["count"]} for name, k in ranked]


def category_table(kernels: dict[str, dict], flops: StepFlops, device_name: str) -> dict:
    """The step's time by category (ms, share, kernel count), the total, the matmuls' TFLOP/s and MFU."""
    rows: dict[str, dict] = {}
    for name, k in kernels.items():
        row = rows.setdefault(category(name), {"ms": 0.0, "kernels": 0.0})
        row["ms"] += k["ms"]
        row["kernels"] += k["count"]
    total = sum(r["ms"] for r in rows.values())
    for row in rows.values():
        row["share"] = row["ms"] / total if total else 0.0
    table = {
        "categories": dict(sorted(rows.items(), key=lambda item: -item[1]["ms"])),
        "total_ms": total,
        "kernels": sum(r["kernels"] for r in rows.values()),
        "model_tflop": flops.total / 1e12,
    }
    matmul_ms = rows.get("matmul", {}).get("ms", 0.0)
    if matmul_ms:
        table["matmul_tflops"] = flops.matmul / (matmul_ms / 1000) / 1e12
    peak = bf16_peak_tflops(device_name)
    if peak and total:
        # against the summed kernel time, so the host's share (launch gaps) is not in it
        table["mfu"] = flops.total / (total / 1000) / (peak * 1e12)
        table["peak_tflops"] = peak
    return table


def format_table(backend: str, table: dict) -> str:
    lines = [
        f"{backend}: {table['total_ms']:.3f} ms of kernel time per step in {table['kernels']:.0f} kernels",
        f"  {'category':<18} {'ms':>9} {'share':>7} {'kernels':>8}",
    ]
    for name, r in table["categories"].items():
        lines.append(f"  {name:<18} {r['ms']:9.3f} {r['share']:7.1%} {r['kernels']:8.0f}")
    extra = []
    if "matmul_tflops" in table:
        extra.append(f"matmuls at {table['matmul_tflops']:.3g} TFLOP/s")
    if "mfu" in table:
        extra.append(f"MFU {table['mfu']:.1%} of {table['peak_tflops']:.0f} TFLOP/s (bf16 peak)")
    if extra:
        lines.append("  " + ", ".join(extra))
    return "\n".join(lines)
