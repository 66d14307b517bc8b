"""The training step captured once as a CUDA graph and replayed (`train.cuda_graph: true`).

A step of a small model is bound by the host, not the GPU: every kernel costs Python and launch time (a
cuTile launch more than most; `python -m gptcore.bench.kernels --host` measures it), with hundreds of
kernels a step. Replayed as a graph, the whole
optimizer step (forward and backward of every micro-batch, gradient clipping, AdamW) is one launch.

PyTorch's whole-network capture (https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture):
- Static memory. The micro-batches' tokens live in fixed buffers, the learning rate in a device tensor that
  the fused, capturable AdamW reads; `step` copies the batch in, fills the rate, and replays.
- Warm-up. The first `warmup_steps` calls run the step eagerly on a side stream, so that nothing lazy is
  captured (kernels compiled, cuBLAS workspaces for that stream, the optimizer's moments and step counters
  created). They are real steps, on the caller's batch and rate and the same code the graph records, so
  training with the graph is the same computation as without it.
- Gradients. They are set to None before capture: the first micro-step's backward then creates them in
  the graph's memory pool (on replay it overwrites them) and later micro-steps add into them, so no
  zero_grad is needed between replays. They must never be set to None or replaced afterwards.
- Autocast runs with cache_enabled=False: its cache of weight casts lives across ops of one region and
  is not meant to be captured (torch.cuda.make_graphed_callables asks for the same).
- Dropout draws from the default CUDA generator, which is graph-safe: each replay advances its Philox
  offset as the eager ops would, so every step gets fresh masks and the RNG state saved in a checkpoint
  moves on as in eager training.
- No host synchronisation inside the step: gradient clipping keeps the norm on the device, the loss is
  summed into a static tensor that the caller reads (`.item()`) after the replay.

Limits: fixed shapes (the batch, micro-steps and block size given at construction); one process (DDP's
gradient all-reduce is not captured here); not in float16 (gptcore.params.cuda_graph_refusal says why);
not with torch.compile (which makes graphs of its own).
"""

from __future__ import annotations

import warnings

import torch

from gptcore.cuda_graphs import capture, on_stream
from gptcore.devices import autocast, dtype_name
from gptcore.params import cuda_graph_refusal

# Warm-up steps before capture: the docs' recipe uses 3, enough for cuBLAS and SDPA to settle.
WARMUP_STEPS = 3


class GraphCaptureError(RuntimeError):
    """The step could not be recorded as a CUDA graph; the message says why."""


class GraphedTrainStep:
    """One optimizer step of `model` with `optimizer`, captured as a CUDA graph after `warmup_steps` eager
    steps. The optimizer must be capturable (`GPT.configure_optimizers(..., capturable=True)`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        dtype: torch.dtype,
        micro_steps: int,
        batch_size: int,
        block_size: int,
        grad_clip: float,
        warmup_steps: int = WARMUP_STEPS,
    ):
        self.device = next(model.parameters()).device
        refusal = cuda_graph_refusal(dtype_name(dtype))
        if refusal:
            raise ValueError(f"the graphed step cannot run in {dtype_name(dtype)}: {refusal}")
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device}")
        if not all(group.get("capturable") for group in optimizer.param_groups):
            raise ValueError(
                "the optimizer is not capturable: build it with configure_optimizers(..., capturable=True)"
            )
        self.model, self.optimizer = model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dtype, self.micro_steps, self.grad_clip = dtype, micro_steps, grad_clip
        self.warmup_steps = warmup_steps
        self.x = torch.zeros(micro_steps, batch_size, block_size, dtype=torch.long, device=self.device)
        self.y = torch.zeros_like(self.x)
        # One device tensor for every group: the captured AdamW reads it, `step` fills it in place.
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float32, device=self.device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        self.loss = torch.zeros((), device=self.device)  # the last step's summed loss, written by the graph
        self.grad_norm: torch.Tensor | None = None  # the last step's gradient norm before clipping
        self.stream = torch.cuda.Stream(self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def step(self, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> torch.Tensor:
        """Train on the micro-batches `xs`, `ys` (micro_steps, batch, block) at learning rate `lr`.

        Returns the loss summed over the micro-steps (each divided by micro_steps): a static tensor that
        the next step overwrites, so read it before then. Nothing here waits for the GPU."""
        if xs.shape != self.x.shape or ys.shape != self.y.shape:
            raise ValueError(
                f"the graphed step takes batches of shape {tuple(self.x.shape)}, got "
                f"{tuple(xs.shape)} and {tuple(ys.shape)}"
            )
        self.x.copy_(xs, non_blocking=True)
        self.y.copy_(ys, non_blocking=True)
        self.lr.fill_(lr)
        if self.graph is None:
            if self.steps < self.warmup_steps:
                self._run_eagerly()
            else:
                self._capture()
        if self.graph is not None:
            self.graph.replay()
        self.steps += 1
        return self.loss

    # ---- the step, as recorded ---------------------------------------------------------------------
    def _body(self) -> None:
        """Forward and backward of every micro-batch, clipping, AdamW: device work only, fixed shapes."""
        self.loss.zero_()
        for micro in range(self.micro_steps):
            with autocast(self.device, self.dtype, cache_enabled=False):
                _, loss = self.model(self.x[micro], self.y[micro])
                loss = loss / self.micro_steps
            loss.backward()
            self.loss += loss.detach()
        if self.grad_clip > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()

    def _run_eagerly(self) -> None:
        """A warm-up step: the body run op by op on the side stream that will capture it."""
        with on_stream(self.stream), warnings.catch_warnings():
            # AdamW warns that a capturable optimizer stepping outside a capture is slower: intended here.
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            self.optimizer.zero_grad(set_to_none=True)
            self._body()

    def _capture(self) -> None:
        # None, not zeros: the capture's first backward then creates the gradients in the graph's pool
        # and its replays overwrite them, instead of adding to tensors from outside the graph.
        self.optimizer.zero_grad(set_to_none=True)
        try:
            graph = capture(self._body, self.stream)
        except Exception as e:  # noqa: BLE001 - reported with the cause, never a silent eager fallback
            raise GraphCaptureError(
                f"the training step could not be captured as a CUDA graph: {type(e).__name__}: {e}"
            ) from e
        self.graph = graph
