"""The LM head and its loss in training, per implementation, at GPT-2 small's training batch: the time of one
forward and backward, and its peak memory above the inputs (torch.cuda.max_memory_allocated).

    python -m gptcore.bench.lm_head [--batch 12 --block 1024 --width 768 --vocab 50304] [--json P] [--csv P]

Rows (hidden states and the head's weight in bf16, leaves that take gradients; targets random, some ignored):
- torch eager and torch compile: F.linear, then F.cross_entropy over the logits in fp32 (the reference model's
  formula; compiled with torch.compile's default mode, whose Inductor kernels fuse the loss);
- cutile logits: F.linear, then the cross-entropy kernels on the whole logits (the model's head for small
  vocabularies);
- cutile fused: kernels/linear_cross_entropy.py, chunks of rows, the logits never whole (the model's head in
  training for large vocabularies).
`--csv` appends a row per implementation (ms, peak MB) with the GPU, date, versions and commit, for results/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gptcore.bench.timing import OK, Recorder, Skip, Timer, append_csv
from gptcore.kernels import cutile_unavailable

IMPLEMENTATIONS = ("torch eager", "torch compile", "cutile logits", "cutile fused")
CSV_FIELDS = ["gpu", "date", "torch", "cuda_tile", "commit", "shape", "implementation", "ms", "peak_mb", "loss"]
MB = 2**20


def torch_head(h, weight, targets):
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)


def cutile_logits_head(h, weight, targets):
    from gptcore.kernels.cross_entropy import cross_entropy

    return cross_entropy(F.linear(h, weight), targets, ignore_index=-1)


def cutile_fused_head(h, weight, targets):
    from gptcore.kernels.linear_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, weight, targets, ignore_index=-1)


def head_fn(implementation: str, device: torch.device):
    if implementation.startswith("cutile"):
        reason = cutile_unavailable(device)
        if reason:
            raise Skip(reason)
        return cutile_fused_head if implementation == "cutile fused" else cutile_logits_head
    return torch.compile(torch_head) if implementation == "torch compile" else torch_head


def inputs(batch: int, block: int, width: int, vocab: int, device: torch.device, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(batch, block, width, device=device, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, width, device=device, generator=g) * 0.02).to(dtype).requires_grad_(True)
    targets = torch.randint(vocab, (batch, block), device=device, generator=g)
    targets[:, ::97] = -1  # a few ignored targets, as padding would give
    return h, weight, targets


def setup_row(implementation: str, x, device: torch.device, found: dict):
    """The timed call (forward and backward); `found` gets the peak memory above the inputs and the loss."""
    fn = head_fn(implementation, device)
    h, weight, targets = x

    def step():
        h.grad = weight.grad = None
        loss = fn(h, weight, targets)
        loss.backward()
        return loss

    for _ in range(2):  # compilation and the allocator settle
        step()
    h.grad = weight.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss = step()
    torch.cuda.synchronize(device)
    found.update(peak_mb=(torch.cuda.max_memory_allocated(device) - base) / MB, loss=loss.item())
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--csv", help="append the rows for results/ here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the LM head comparison needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    shape = f"B{args.batch}xT{args.block} C{args.width} V{args.vocab}"
    x = inputs(args.batch, args.block, args.width, args.vocab, device)
    rec = Recorder(device, Timer(device, warmup=2, repeats=args.repeats, min_repeat_ms=20.0))
    print(f"LM head + cross-entropy, forward and backward, on {rec.env['device']}: {shape} bf16")
    for implementation in args.implementations:
        found: dict = {}
        r = rec.measure(
            "lm_head", implementation, shape, "bfloat16", lambda i=implementation: setup_row(i, x, device, found)
        )
        r.update(found)
        if r["status"] == OK:
            print(f"    peak {found['peak_mb']:9.1f} MB above the inputs, loss {found['loss']:.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"records": rec.records}, indent=1, default=str), encoding="utf-8")
    if args.csv:
        rows = [
            {**r, "gpu": r["device"], "ms": round(r["ms"], 4), "peak_mb": round(r["peak_mb"], 1)}
            | {"loss": round(r["loss"], 6)}
            for r in rec.records
            if r["status"] == OK
        ]
        append_csv(args.csv, CSV_FIELDS, rows)
    return 0 if all(r["status"] == OK for r in rec.records) else 1


if __name__ == "__main__":
    sys.exit(main())
