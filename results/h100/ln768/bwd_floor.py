"""Where the 768 LayerNorm backward's time goes: cuTile adds (same bytes, same tilings), the backward without
column sums, chunked variants, against the production backward and torch's add. Graph replay, 16384 x 768 bf16.
Run on a CUDA GPU from the repository root: PYTHONPATH=. python3 results/h100/ln768/bwd_floor.py
"""
import statistics, torch
import cuda.tile as ct
from gptcore.kernels import layernorm as L, stream_handle
from gptcore.kernels.bench import time_graph_ms

ConstInt = ct.Constant[int]; ConstBool = ct.Constant[bool]; ZERO = ct.PaddingMode.ZERO


def _l(A, index, shape, LAT):
    return ct.load(A, index, shape, padding_mode=ZERO, latency=LAT).astype(ct.float32)


def add_pad_body(X, DY, DX, N_PAD: ConstInt, TILE_ROWS: ConstInt, LAT: ConstInt):
    for t in range(ct.bid(0), ct.cdiv(X.shape[0], TILE_ROWS), ct.num_blocks(0)):
        ct.store(DX, (t, 0), (_l(X, (t, 0), (TILE_ROWS, N_PAD), LAT) + _l(DY, (t, 0), (TILE_ROWS, N_PAD), LAT)).astype(DX.dtype))


def add_chunk_body(X, DY, DX, C: ConstInt, K: ConstInt, TILE_ROWS: ConstInt, LAT: ConstInt):
    for t in range(ct.bid(0), ct.cdiv(X.shape[0], TILE_ROWS), ct.num_blocks(0)):
        for k in ct.static_iter(range(K)):
            ct.store(DX, (t, k), (_l(X, (t, k), (TILE_ROWS, C), LAT) + _l(DY, (t, k), (TILE_ROWS, C), LAT)).astype(DX.dtype))


def rowsum_chunk_body(X, DY, STATS, DX, C: ConstInt, K: ConstInt, TILE_ROWS: ConstInt, LAT: ConstInt):
    """The backward's dx (weight present) as K chunks, without column sums."""
    n = X.shape[1]
    for t in range(ct.bid(0), ct.cdiv(X.shape[0], TILE_ROWS), ct.num_blocks(0)):
        mean = ct.load(STATS, (0, t), (1, TILE_ROWS), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        rstd = ct.load(STATS, (1, t), (1, TILE_ROWS), padding_mode=ZERO).reshape((TILE_ROWS, 1))
        xs = (); dys = ()
        s1 = ct.zeros((TILE_ROWS, 1), dtype=ct.float32); s2 = ct.zeros((TILE_ROWS, 1), dtype=ct.float32)
        for k in ct.static_iter(range(K)):
            xh = (_l(X, (t, k), (TILE_ROWS, C), LAT) - mean) * rstd
            dy = _l(DY, (t, k), (TILE_ROWS, C), LAT)
            xs += (xh,); dys += (dy,)
            s1 = s1 + ct.sum(xh * dy, axis=1, keepdims=True); s2 = s2 + ct.sum(dy, axis=1, keepdims=True)
        c1 = s1 / n; c2 = s2 / n
        for k in ct.static_iter(range(K)):
            ct.store(DX, (t, k), ((dys[k] - (xs[k] * c1 + c2)) * rstd).astype(DX.dtype))


def kern(body, occ, warps=None):
    return ct.kernel(body, occupancy=occ, num_worker_warps=warps)


M, N = 16384, 768
dev = torch.device("cuda"); dt = torch.bfloat16
torch.manual_seed(0)
x = torch.randn(M, N, device=dev, dtype=dt); dy = torch.randn_like(x); dx = torch.empty_like(x)
w = torch.randn(N, device=dev, dtype=dt); b = torch.randn(N, device=dev, dtype=dt)
y, stats = L.layer_norm_forward(x, w, b, 1e-5)
sms = torch.cuda.get_device_properties(0).multi_processor_count
s = lambda: stream_handle(0)
prod = L._plan(0, N, None)
T = prod.tiles
print("production tiles", T, flush=True)

cases = {}
cases["torch add"] = lambda: torch.add(x, dy, out=dx)
cases["torch copy (fwd floor)"] = lambda: dx.copy_(x)
cases["prod bwd kernel+colsum"] = lambda: L.layer_norm_backward(x, w, b.dtype, stats, dy)
pb = prod.bwd
gb = sms * T.bwd_blocks_per_sm
parts = torch.empty(2, gb, N, device=dev)
cases["prod bwd kernel only"] = lambda: ct.launch(s(), (gb, 1, 1), pb, (x, w, dy, stats, dx, parts, 1024, T.bwd_rows, True, True, T.bwd_latency, False))
cases["prod bwd, no column sums (no w, b)"] = lambda: ct.launch(s(), (gb, 1, 1), pb, (x, stats, dy, stats, dx, parts, 1024, T.bwd_rows, False, False, T.bwd_latency, False))
for rows, occ, bps, lat in ((8, 2, 2, 4), (8, 4, 4, 4), (16, 2, 2, 4), (4, 4, 4, 4)):
    k = kern(add_pad_body, occ)
    cases[f"ct add pad1024 r{rows} occ{occ} {bps}/SM lat{lat}"] = (lambda k=k, rows=rows, bps=bps, lat=lat:
        ct.launch(s(), (sms * bps, 1, 1), k, (x, dy, dx, 1024, rows, lat)))
for rows, occ, bps, lat in ((8, 2, 2, 4), (8, 4, 4, 4), (16, 2, 2, 4)):
    k = kern(add_chunk_body, occ)
    cases[f"ct add 3x256 r{rows} occ{occ} {bps}/SM lat{lat}"] = (lambda k=k, rows=rows, bps=bps, lat=lat:
        ct.launch(s(), (sms * bps, 1, 1), k, (x, dy, dx, 256, 3, rows, lat)))
for rows, occ, bps, lat in ((8, 2, 2, 4), (8, 4, 4, 4), (16, 2, 2, 4), (4, 4, 4, 4)):
    k = kern(rowsum_chunk_body, occ)
    cases[f"ct dx-only 3x256 r{rows} occ{occ} {bps}/SM lat{lat}"] = (lambda k=k, rows=rows, bps=bps, lat=lat:
        ct.launch(s(), (sms * bps, 1, 1), k, (x, dy, stats, dx, 256, 3, rows, lat)))

res = {name: [] for name in cases}
for rep in range(3):
    for name, fn in cases.items():
        try:
            res[name].append(time_graph_ms(fn, repeats=20, inner=10) * 1e3)
        except Exception as e:
            res[name].append(float("nan")); print(name, "failed:", type(e).__name__, str(e)[:300], flush=True)
for name, v in res.items():
    print(f"{name:45s} {statistics.median(v):7.2f} us   {[round(a, 2) for a in v]}", flush=True)
