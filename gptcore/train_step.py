"""The training step: one optimizer step over the micro-batches of one iteration, run op by op, through
torch.compile, or replayed as a captured CUDA graph (gptcore/train_graph.py). `make_train_step` builds it
for the Trainer and for the bench's train-step rows alike, so the bench times the step that trains.

Every step is called as `step.step(xs, ys, lr)` with the micro-batches' inputs and targets stacked as
(micro_steps, batch, block) and returns the loss summed over the micro-steps (each divided by
micro_steps), on the device.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.distributed as dist

from gptcore.devices import autocast
from gptcore.model import GPT
from gptcore.train_graph import GraphedTrainStep

StepMode = Literal["eager", "compile", "graph"]


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for float16, whose narrow exponent range loses small gradients; a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


class EagerTrainStep:
    """The step run op by op: forward and backward of every micro-batch under autocast, gradient clipping,
    AdamW through the GradScaler. `forward` is `model` as trained (compiled, wrapped in DDP); under DDP the
    gradients are all-reduced on the last micro-step only, and the loss averaged over the processes."""

    def __init__(
        self,
        model: GPT,
        forward: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        *,
        dtype: torch.dtype,
        micro_steps: int,
        grad_clip: float,
        distributed: bool,
        mark_steps: bool = False,
    ):
        self.model, self.forward, self.optimizer, self.scaler = model, forward, optimizer, scaler
        self.mark_steps = mark_steps  # reduce-overhead: each micro-step starts a new round of graph replays
        self.device = next(model.parameters()).device
        self.dtype, self.micro_steps, self.grad_clip, self.distributed = dtype, micro_steps, grad_clip, distributed

    def step(self, xs: torch.Tensor, ys: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.mark_steps:
            self._keep_grads()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.micro_steps):
            last = micro == self.micro_steps - 1
            no_sync = self.forward.no_sync() if self.distributed and not last else contextlib.nullcontext()
            if self.mark_steps:  # the previous micro-step's outputs are consumed: their graph memory may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with no_sync, autocast(self.device, self.dtype):
                _, loss = self.forward(xs[micro], ys[micro])
                loss = loss / self.micro_steps
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=not self.mark_steps)
        if self.distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        return loss_sum

    def _keep_grads(self) -> None:
        """Gradients that exist before the first backward, zeroed (not freed) after each step. With a None
        gradient, autograd keeps the backward's output tensor itself as .grad; under reduce-overhead that tensor
        lives in the graphs' memory, which the next micro-step's replay overwrites (an error with gradient
        accumulation). An existing gradient is added to in place instead."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)


TrainStep = EagerTrainStep | GraphedTrainStep


def make_train_step(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    *,
    mode: StepMode,
    dtype: torch.dtype,
    micro_steps: int,
    batch_size: int,
    block_size: int,
    grad_clip: float,
    scaler: torch.amp.GradScaler | None = None,
    distributed: bool = False,
    compile_mode: str | None = None,
) -> TrainStep:
    """The training step of `model` (as built: not compiled, not wrapped) with `optimizer`.

    `mode`: "eager" (op by op), "compile" (the forward through torch.compile) or "graph" (captured as a
    CUDA graph after its warm-up steps; the optimizer must be capturable, and ValueError says what else
    it refuses). `batch_size`, `block_size`: the micro-batches' shape, which the graph fixes. `scaler`: the
    run's GradScaler (it is saved with the run); a fresh one for `dtype` when None. `distributed`: wrap
    the model in DDP (this process is one of a torchrun launch). `compile_mode`: torch.compile's mode in
    "compile" (None: its default; "reduce-overhead" adds its CUDA graphs)."""
    prepare_half_weights = getattr(model, "prepare_half_weights", None)
    if prepare_half_weights is not None:  # the cuTile model's half weight copies, before any compile or capture
        prepare_half_weights(dtype)
    if mode == "graph":
        if distributed:
            raise ValueError("the graphed step runs in one process: DDP's gradient all-reduce is not captured")
        return GraphedTrainStep(
            model,
            optimizer,
            dtype=dtype,
            micro_steps=micro_steps,
            batch_size=batch_size,
            block_size=block_size,
            grad_clip=grad_clip,
        )
    if mode not in ("eager", "compile"):
        raise ValueError(f"mode must be 'eager', 'compile' or 'graph', got {mode!r}")
    device = next(model.parameters()).device
    forward = torch.compile(model, mode=compile_mode) if mode == "compile" else model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None)
    return EagerTrainStep(
        model,
        forward,
        optimizer,
        scaler if scaler is not None else grad_scaler(device, dtype),
        dtype=dtype,
        micro_steps=micro_steps,
        grad_clip=grad_clip,
        distributed=distributed,
        mark_steps=mode == "compile" and compile_mode == "reduce-overhead",
    )
