"""L4: greedy decoding from the same prompts: the token streams must be identical.

Both models decode under the same autocast dtype (`verify.decode_dtype`): comparing a low-precision
candidate with an fp32 reference would measure rounding, not the kernels. float16 by default: it rounds
8x finer than bfloat16, so rounding flips a near-tie between two tokens less often, while a kernel error
stands out more. Decoding follows nanoGPT's generate (no KV cache; the context cropped to the block
size), so streams longer than the block slide their window.

On a divergence the report gives the position and both tokens, and the float32 reference arbitrates: on
the common prefix, which token it picks and its logit gap between the two. A gap near 0 is a near-tie
that rounding can flip; a large one points at the kernels.
"""

from __future__ import annotations

import torch

from gptcore.model import GPT
from gptcore.verify.common import Result, autocast

TITLE = "greedy decoding: identical token streams"
COLUMNS = ["prompt", "tokens", "identical", "first divergence", "reference", "candidate", "fp32 reference",
           "text (reference)"]


@torch.no_grad()
def greedy(model: GPT, prompts: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, steps) tokens chosen greedily after each prompt row."""
    idx, block = prompts, model.config.block_size
    for _ in range(steps):
        with autocast(prompts.device, dtype):
            logits, _ = model(idx[:, -block:])
        idx = torch.cat((idx, logits[:, -1, :].float().argmax(-1, keepdim=True)), dim=1)
    return idx[:, prompts.size(1):]


def _show(decode, ids) -> str:
    if decode is None:
        return ""
    return repr(decode(ids))[1:-1][:60]


@torch.no_grad()
def run(ref: GPT, cand: GPT, prompts: torch.Tensor, steps: int, dtype: torch.dtype, decode=None) -> Result:
    """`decode(ids) -> str` (the vocabulary's) makes the report readable; optional."""
    result = Result("L4", TITLE, columns=COLUMNS)
    result.tolerance = {"identical_streams": "all"}
    ref_tokens = greedy(ref, prompts, steps, dtype)
    cand_tokens = greedy(cand, prompts, steps, dtype)
    divergences = []
    for i in range(prompts.size(0)):
        a, b = ref_tokens[i].tolist(), cand_tokens[i].tolist()
        pos = next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), None)
        row = {"prompt": i, "tokens": steps, "identical": pos is None, "first divergence": "-", "reference": "",
               "candidate": "", "fp32 reference": "", "text (reference)": _show(decode, a)}
        if pos is not None:
            divergences.append(pos)
            prefix = torch.cat((prompts[i], ref_tokens[i, :pos]))[None, -ref.config.block_size:]
            logits, _ = ref(prefix)  # float32: no autocast
            logits = logits[0, -1].float()
            top = int(logits.argmax())
            row.update({"first divergence": pos, "reference": f"{a[pos]} {_show(decode, [a[pos]])!r}",
                        "candidate": f"{b[pos]} {_show(decode, [b[pos]])!r}",
                        "fp32 reference": f"picks {top}, gap {abs(logits[a[pos]] - logits[b[pos]]).item():.3g}"})
            result.fail(f"prompt {i}: streams differ at token {pos}: reference {a[pos]} "
                        f"{_show(decode, [a[pos]])!r}, candidate {b[pos]} {_show(decode, [b[pos]])!r}")
        result.rows.append(row)
    result.figures = {
        "prompts": prompts.size(0), "prompt_tokens": prompts.size(1), "tokens_per_prompt": steps,
        "identical_prompts": sum(r["identical"] for r in result.rows),
        "first_divergence": min(divergences) if divergences else -1,
    }
    return result
