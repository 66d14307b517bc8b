"""L4: greedy decoding from the same prompts: the token streams must be identical.

Both models decode under the same autocast dtype (`verify.decode_dtype`): comparing a low-precision
candidate with an fp32 reference would measure rounding, not the kernels. float16 by default: it rounds
8x finer than bfloat16, so rounding flips a near-tie between two tokens less often, while a kernel error
stands out more. The reference decodes as nanoGPT's generate does (no KV cache; the context cropped to the
block size, so streams longer than the block slide their window); the candidate decodes as the sampler and
the bot do, through its KV cache (`CachedGreedy`: the prompt into an empty cache, then one token per step, and
once the window slides the whole window again), so its decode-step kernels are what this level checks.

The two models decode in lockstep. Where their tokens differ, the float32 reference arbitrates on the
common prefix: which token it picks and its logit gap between the two. A gap within
`verify.decode_tie_gap` is a rounding tie (at logits of ~10, float16 itself only resolves ~0.008): it
is reported, and the candidate goes on from the reference's token so the rest of the stream is still
compared. A larger gap is a divergence: the level fails, naming the position and both tokens. With
`decode_tie_gap: 0` any difference fails.
"""

from __future__ import annotations

import torch

from gptcore.devices import autocast
from gptcore.model import GPT
from gptcore.verify.common import Result

TITLE = "greedy decoding (the candidate through its KV cache): identical token streams"
COLUMNS = [
    "prompt",
    "tokens",
    "identical",
    "rounding ties",
    "first divergence",
    "reference",
    "candidate",
    "fp32 reference",
    "text (reference)",
]


@torch.no_grad()
def next_tokens(model: GPT, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The greedy next token of every row of `idx` (B, T), as a (B,) tensor."""
    with autocast(idx.device, dtype):
        logits, _ = model(idx[:, -model.config.block_size :])
    return logits[:, -1, :].float().argmax(-1)


class CachedGreedy:
    """A model's greedy next tokens through its KV cache, as gptcore.sampling.Decoder feeds it: a context that
    continues the cached one by a token runs that token alone; any other (the first, or a window that slid past
    block_size) runs its last block_size tokens into the emptied cache."""

    def __init__(self, model: GPT, batch: int):
        self.model = model
        self.cache = model.new_kv_cache(batch)
        self.fed = 0  # context tokens in the cache

    @torch.no_grad()
    def __call__(self, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        block = self.model.config.block_size
        if 0 < self.fed < block and idx.size(1) == self.fed + 1:
            new = idx[:, self.fed :]
        else:
            new = idx[:, -block:]
            for layer in self.cache:
                layer.length = 0
            self.fed = 0
        with autocast(idx.device, dtype):
            logits, _ = self.model(new, kv_cache=self.cache)
        self.fed += new.size(1)
        return logits[:, -1, :].float().argmax(-1)


@torch.no_grad()
def arbitrate(ref: GPT, prefix: torch.Tensor, a: int, b: int) -> tuple[int, float]:
    """The float32 reference on `prefix` (T,): its pick and its logit gap between tokens a and b."""
    logits, _ = ref(prefix[None, -ref.config.block_size :])  # float32: no autocast
    logits = logits[0, -1].float()
    return int(logits.argmax()), abs(logits[a] - logits[b]).item()


@torch.no_grad()
def lockstep(ref: GPT, cand: GPT, prompts: torch.Tensor, steps: int, dtype: torch.dtype, tie_gap: float):
    """Greedy streams of both models, (B, steps) each, and per row the ties [(pos, a, b, gap, pick)] and the
    first divergence (pos, a, b, gap, pick) or None. After a divergence a row's candidate decodes on its own. The
    candidate decodes through its KV cache (CachedGreedy)."""
    ref_idx, cand_idx = prompts, prompts
    cand_next = CachedGreedy(cand, prompts.size(0))
    ties: list[list[tuple]] = [[] for _ in range(prompts.size(0))]
    diverged: list[tuple | None] = [None] * prompts.size(0)
    for pos in range(steps):
        a, b = next_tokens(ref, ref_idx, dtype), cand_next(cand_idx, dtype)
        for row in (a != b).nonzero().flatten().tolist():
            if diverged[row] is not None:
                continue
            ta, tb = int(a[row]), int(b[row])
            pick, gap = arbitrate(ref, ref_idx[row], ta, tb)
            if gap <= tie_gap:
                ties[row].append((pos, ta, tb, gap, pick))
                b[row] = ta  # a rounding tie: the candidate goes on from the reference's token
            else:
                diverged[row] = (pos, ta, tb, gap, pick)
        ref_idx = torch.cat((ref_idx, a[:, None]), dim=1)
        cand_idx = torch.cat((cand_idx, b[:, None]), dim=1)
    n = prompts.size(1)
    return ref_idx[:, n:], cand_idx[:, n:], ties, diverged


def _show(decode, ids) -> str:
    if decode is None:
        return ""
    return repr(decode(ids))[1:-1][:60]


def run(
    ref: GPT, cand: GPT, prompts: torch.Tensor, steps: int, dtype: torch.dtype, decode=None, tie_gap: float = 0.0
) -> Result:
    """`decode(ids) -> str` (the vocabulary's) makes the report readable; optional."""
    result = Result("L4", TITLE, columns=COLUMNS)
    result.tolerance = {"identical_streams": "all", "tie_gap": tie_gap}
    ref_tokens, _, ties, diverged = lockstep(ref, cand, prompts, steps, dtype, tie_gap)

    def token(t):
        return f"{t} {_show(decode, [t])!r}"

    for i in range(prompts.size(0)):
        row = {
            "prompt": i,
            "tokens": steps,
            "identical": not ties[i] and diverged[i] is None,
            "rounding ties": "; ".join(f"{p}: {token(a)} / {token(b)}, gap {g:.2g}" for p, a, b, g, _ in ties[i])
            or "-",
            "first divergence": "-",
            "reference": "",
            "candidate": "",
            "fp32 reference": "",
            "text (reference)": _show(decode, ref_tokens[i].tolist()),
        }
        if diverged[i] is not None:
            pos, a, b, gap, pick = diverged[i]
            row.update(
                {
                    "first divergence": pos,
                    "reference": token(a),
                    "candidate": token(b),
                    "fp32 reference": f"picks {pick}, gap {gap:.3g}",
                }
            )
            result.fail(
                f"prompt {i}: streams differ at token {pos}: reference {token(a)}, candidate {token(b)} "
                f"(float32 logit gap {gap:.3g} > tie gap {tie_gap:g})"
            )
        result.rows.append(row)
    all_ties = [t for row_ties in ties for t in row_ties]
    divergences = [d[0] for d in diverged if d is not None]
    result.figures = {
        "prompts": prompts.size(0),
        "prompt_tokens": prompts.size(1),
        "tokens_per_prompt": steps,
        "identical_prompts": sum(r["identical"] for r in result.rows),
        "rounding_ties": len(all_ties),
        "max_tie_gap": max((t[3] for t in all_ties), default=0.0),
        "first_divergence": min(divergences) if divergences else -1,
    }
    return result
