"""L2: each transformer block on the trained weights, fed the same input; and the drift through the stack.

Per block i, both models' block i get the reference's hidden state h_i (embeddings of real validation
text for i = 0) and their outputs are compared: this isolates each block. The drift then runs the
candidate's whole stack from h_0 and compares its h_i with the reference's after every layer: the error
the candidate accumulates on its own.
"""

from __future__ import annotations

import torch

from gptcore.devices import autocast
from gptcore.model import GPT
from gptcore.verify.common import Result, abs_diff, scaled_max, scaled_mean, within

TITLE = "transformer blocks on the trained weights"
COLUMNS = ["what", "layer", "max abs diff", "mean abs diff", "max abs ref", "max err", "mean err", "status"]


@torch.no_grad()
def run(ref: GPT, cand: GPT, x: torch.Tensor, dtype: torch.dtype, tol) -> Result:
    result = Result("L2", TITLE, columns=COLUMNS)
    result.tolerance = {
        "block_max": tol.block_max,
        "block_mean": tol.block_mean,
        "stack_max": tol.stack_max,
        "stack_mean": tol.stack_mean,
    }
    device = x.device
    pos = torch.arange(x.size(1), device=device)
    with autocast(device, dtype):
        hidden = [ref.transformer.wte(x) + ref.transformer.wpe(pos)]  # dropout is off in eval mode
        for block in ref.transformer.h:
            hidden.append(block(hidden[-1]))
        isolated = [block(h) for block, h in zip(cand.transformer.h, hidden)]
        drift, h = [], hidden[0]
        for block in cand.transformer.h:
            h = block(h)
            drift.append(h)

    def row(what, layer, ref_out, cand_out, max_tol, mean_tol):
        mx, mean = abs_diff(ref_out, cand_out)
        smax, smean = scaled_max(ref_out, cand_out), scaled_mean(ref_out, cand_out)
        ok = within(smax, max_tol) and within(smean, mean_tol)
        return {
            "what": what,
            "layer": layer,
            "max abs diff": mx,
            "mean abs diff": mean,
            "max abs ref": ref_out.abs().max().item(),
            "max err": smax,
            "mean err": smean,
            "status": "pass"
            if ok
            else f"fail: max err {smax:.3g} (tol {max_tol:g}), mean err {smean:.3g} (tol {mean_tol:g})",
        }

    for i, out in enumerate(isolated):
        result.rows.append(row("block, same input", i, hidden[i + 1], out, tol.block_max, tol.block_mean))
    for i, out in enumerate(drift):
        # Only the final layer is held to the stack tolerance; the earlier ones show how the drift grows.
        last = i == len(drift) - 1
        r = row(
            "whole stack (drift)",
            i,
            hidden[i + 1],
            out,
            tol.stack_max if last else float("inf"),
            tol.stack_mean if last else float("inf"),
        )
        result.rows.append(r)

    blocks = [r for r in result.rows if r["what"].startswith("block")]
    worst = max(blocks, key=lambda r: r["max err"])
    final = result.rows[-1]
    result.figures = {
        "block_max_err": max(r["max err"] for r in blocks),
        "block_mean_err": max(r["mean err"] for r in blocks),
        "worst_block": worst["layer"],
        "block_max_abs_diff": max(r["max abs diff"] for r in blocks),
        "stack_max_err": final["max err"],
        "stack_mean_err": final["mean err"],
        "stack_max_abs_diff": final["max abs diff"],
        "stack_mean_abs_diff": final["mean abs diff"],
    }
    for r in result.rows:
        if r["status"] != "pass":
            result.fail(f"{r['what']} layer {r['layer']}: {r['status'].removeprefix('fail: ')}")
    return result
