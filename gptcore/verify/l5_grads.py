"""L5: one backward pass on a real batch: the relative error of every parameter's gradient.

Both models run in eval mode (no dropout, so both see the same function) under the same autocast, loss
on a batch of validation text, one backward. Per parameter: ||g_cand - g_ref|| / ||g_ref||.
"""

from __future__ import annotations

import math
import statistics

import torch

from gptcore.devices import autocast
from gptcore.model import GPT
from gptcore.verify.common import Result, within

TITLE = "gradients of one backward pass"
COLUMNS = ["parameter", "shape", "norm of g ref", "rel err", "status"]
SHOWN = 12  # the report lists the worst parameters; the figures cover all


def gradients(model: GPT, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    with autocast(x.device, dtype):
        _, loss = model(x, y)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def run(ref: GPT, cand: GPT, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, tol) -> Result:
    result = Result("L5", TITLE, columns=COLUMNS)
    result.tolerance = {"grad_rel": tol.grad_rel}
    ref_loss, ref_grads = gradients(ref, x, y, dtype)
    cand_loss, cand_grads = gradients(cand, x, y, dtype)
    missing = sorted(set(ref_grads) - set(cand_grads))
    if missing:
        result.fail(f"no gradient reached {', '.join(missing[:8])}")
    errs = {}
    for name, g in ref_grads.items():
        if name in cand_grads:
            norm = g.double().norm().item()
            diff = (cand_grads[name].double() - g.double()).norm().item()
            errs[name] = diff / norm if norm > 0 else diff  # a zero reference gradient: the absolute error
    ranked = sorted(errs, key=lambda n: math.inf if math.isnan(errs[n]) else errs[n], reverse=True)  # NaN first
    for name in ranked[:SHOWN]:
        ok = within(errs[name], tol.grad_rel)
        result.rows.append(
            {
                "parameter": name,
                "shape": "x".join(map(str, ref_grads[name].shape)),
                "norm of g ref": ref_grads[name].double().norm().item(),
                "rel err": errs[name],
                "status": "pass" if ok else f"fail: > {tol.grad_rel:g}",
            }
        )
    if len(ranked) > SHOWN:
        result.notes.append(f"The {SHOWN} worst of {len(ranked)} parameters are listed.")
    worst = ranked[0]
    result.figures = {
        "grad_rel_max": errs[worst],
        "grad_rel_median": statistics.median(errs.values()),
        "worst_parameter": worst,
        "parameters": len(errs),
        "loss_ref": ref_loss,
        "loss_cand": cand_loss,
    }
    bad = [n for n in ranked if not within(errs[n], tol.grad_rel)]
    if bad:
        result.fail(
            f"{len(bad)} of {len(errs)} gradients out of tolerance; worst {worst}: rel err "
            f"{errs[worst]:.3g} > {tol.grad_rel:g}"
        )
    return result
