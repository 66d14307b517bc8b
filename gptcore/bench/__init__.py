"""Benchmarks of the cuTile model and kernels against PyTorch, measured side by side in one process.

timing.py   the one timer and record schema (also used by the tile sweeps)
kernels.py  attention and LayerNorm rows; `python -m gptcore.bench.kernels` prints the kernel tables
model.py    training step, prefill and decode rows of a checkpoint's model (the bench stage)
tune.py     tile sweeps of the kernels; `python -m gptcore.bench.tune` prints the ranking and the winners
"""
