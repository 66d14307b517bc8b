"""L3: full forward on batches of real validation text: logits, next-token distributions, loss.

Figures: max and mean abs difference of the logits (and the scaled errors the tolerances bound), the mean
and max KL(ref || cand) of the softmax distributions per position, the fraction of positions whose argmax
agrees, both validation losses. For scale, the same figures for the reference itself in `dtype` against
the reference in float32: what the low precision alone costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gptcore.devices import autocast
from gptcore.model import GPT
from gptcore.verify.common import Result, abs_diff, at_least, scaled_max, scaled_mean, within

TITLE = "logits on validation text"
COLUMNS = [
    "batch",
    "max abs diff",
    "mean abs diff",
    "max err",
    "mean err",
    "KL mean",
    "KL max",
    "top-1 agree",
    "loss ref",
    "loss cand",
]


def compare_logits(ref: torch.Tensor, cand: torch.Tensor) -> dict:
    ref, cand = ref.float(), cand.float()
    mx, mean = abs_diff(ref, cand)
    logp_ref, logp_cand = F.log_softmax(ref, dim=-1), F.log_softmax(cand, dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logp_cand)).sum(-1)  # per position, nats
    return {
        "max abs diff": mx,
        "mean abs diff": mean,
        "max err": scaled_max(ref, cand),
        "mean err": scaled_mean(ref, cand),
        "KL mean": kl.mean().item(),
        "KL max": kl.max().item(),
        "top-1 agree": (ref.argmax(-1) == cand.argmax(-1)).float().mean().item(),
    }


@torch.no_grad()
def run(ref: GPT, cand: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, tol) -> Result:
    result = Result("L3", TITLE, columns=COLUMNS)
    result.tolerance = {
        "logits_max": tol.logits_max,
        "logits_mean": tol.logits_mean,
        "kl_mean": tol.kl_mean,
        "top1_min": tol.top1_min,
    }
    baseline = []
    for i, (x, y) in enumerate(batches):
        with autocast(x.device, dtype):
            ref_logits, ref_loss = ref(x, y)  # with targets the model returns logits for every position
            cand_logits, cand_loss = cand(x, y)
        result.rows.append(
            {
                "batch": i,
                **compare_logits(ref_logits, cand_logits),
                "loss ref": ref_loss.item(),
                "loss cand": cand_loss.item(),
            }
        )
        if dtype != torch.float32:
            fp32_logits, _ = ref(x, y)
            baseline.append(compare_logits(fp32_logits, ref_logits))

    n = len(result.rows)
    f = {
        "logits_max_abs_diff": max(r["max abs diff"] for r in result.rows),
        "logits_mean_abs_diff": sum(r["mean abs diff"] for r in result.rows) / n,
        "logits_max_err": max(r["max err"] for r in result.rows),
        "logits_mean_err": sum(r["mean err"] for r in result.rows) / n,
        "kl_mean": sum(r["KL mean"] for r in result.rows) / n,
        "kl_max": max(r["KL max"] for r in result.rows),
        "top1_agreement": sum(r["top-1 agree"] for r in result.rows) / n,
        "loss_ref": sum(r["loss ref"] for r in result.rows) / n,
        "loss_cand": sum(r["loss cand"] for r in result.rows) / n,
        "positions": sum(x.numel() for x, _ in batches),
    }
    if baseline:
        f.update(
            {
                "baseline_logits_max_err": max(b["max err"] for b in baseline),
                "baseline_kl_mean": sum(b["KL mean"] for b in baseline) / len(baseline),
                "baseline_top1_agreement": sum(b["top-1 agree"] for b in baseline) / len(baseline),
            }
        )
        result.notes.append(
            f"For scale, the reference under {str(dtype).removeprefix('torch.')} autocast against itself in float32: "
            f"max err {f['baseline_logits_max_err']:.3g}, KL mean {f['baseline_kl_mean']:.3g}, "
            f"top-1 agreement {f['baseline_top1_agreement']:.4f}."
        )
    result.figures = f
    if not within(f["logits_max_err"], tol.logits_max):
        result.fail(f"logits max err {f['logits_max_err']:.3g} > {tol.logits_max:g}")
    if not within(f["logits_mean_err"], tol.logits_mean):
        result.fail(f"logits mean err {f['logits_mean_err']:.3g} > {tol.logits_mean:g}")
    if not within(f["kl_mean"], tol.kl_mean):
        result.fail(f"KL mean {f['kl_mean']:.3g} > {tol.kl_mean:g}")
    if not at_least(f["top1_agreement"], tol.top1_min):
        result.fail(f"top-1 agreement {f['top1_agreement']:.4f} < {tol.top1_min:g}")
    return result
