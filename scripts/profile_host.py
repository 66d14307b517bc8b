"""cProfile of the eager cuTile LayerNorm and attention forward+backward at tiny sizes (host time only).

    python scripts/profile_host.py [calls]
"""

import cProfile
import pstats
import sys

import torch

from gptcore.kernels.attention import causal_attention
from gptcore.kernels.layernorm import layer_norm


def main() -> int:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    dt = torch.bfloat16
    x = torch.randn(64, 384, device="cuda", dtype=dt, requires_grad=True)
    w = torch.ones(384, device="cuda", requires_grad=True)
    b = torch.zeros(384, device="cuda", requires_grad=True)
    dy = torch.randn(64, 384, device="cuda", dtype=dt)
    q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 1, 64, 64, device="cuda", dtype=dt)

    def ln():
        torch.autograd.grad(layer_norm(x, w, b), (x, w, b), dy)

    def attn():
        torch.autograd.grad(causal_attention(q, k, v), (q, k, v), do)

    for name, fn in (("layer_norm", ln), ("attention", attn)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        # Backward on the calling thread: cProfile sees one thread only.
        with torch.autograd.set_multithreading_enabled(False):
            prof.enable()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            prof.disable()
        print(f"\n===== {name} fwd+bwd, {calls} calls =====")
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
