"""The training loop: AdamW, warmup + cosine learning rate, gradient accumulation, mixed precision,
periodic evaluation, best-val and resumable checkpoints, and data-parallel training under torchrun.

Batches are drawn so that a run gives the same result on any number of processes: every iteration all
processes draw the offsets of every micro-batch of the global batch from one generator seeded alike,
and each process trains on its share. One process with `gradient_accumulation_steps: 2` and two
processes with one micro-step each therefore see the same data and compute the same update.

The run is in parts: `RunState` (model, optimizer, RNG, iteration, best; saved to and restored from a
checkpoint), the step from gptcore/train_step.py (op by op, compiled, or with `train.cuda_graph: true`
replayed as one captured CUDA graph; everything around it is the same), and `Trainer.run`, the loop.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from gptcore import data as gdata
from gptcore.checkpoint import load_checkpoint, save_checkpoint
from gptcore.cutile_model import build_model
from gptcore.devices import autocast, dtype_name, resolve_device, resolve_dtype
from gptcore.errors import CheckpointError
from gptcore.files import output_error, partial_writes, remove
from gptcore.kernels import require_cutile
from gptcore.manifest import manifest_path
from gptcore.memory import check_fits
from gptcore.model import GPT, GPTConfig
from gptcore.params import Params, ParamsError, cuda_graph_refusal
from gptcore.tokenizer import load as load_tokenizer
from gptcore.train_step import TrainStep, grad_scaler, make_train_step

BEST_CHECKPOINT = "ckpt.pt"  # the lowest validation loss seen: what the later stages use
LAST_CHECKPOINT = "last.pt"  # the latest evaluation point, with RNG states: what `resume` continues
# The best checkpoint of a run in progress: it replaces ckpt.pt (with its manifest) only when the run ends,
# so a failed or interrupted run leaves the previous checkpoint and manifest as they were. With last.pt it
# is the state a resumed run continues; the next run that starts afresh removes it.
STAGED_CHECKPOINT = "ckpt.pt.next"


@dataclass
class Dist:
    """Where this process stands in a torchrun launch (rank 0 of 1 when run plainly)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        if "RANK" not in os.environ:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def learning_rate(it: int, p) -> float:
    """Linear warmup, then cosine decay from learning_rate to min_lr at lr_decay_iters (nanoGPT)."""
    if not p.decay_lr:
        return p.learning_rate
    if it < p.warmup_iters:
        return p.learning_rate * (it + 1) / (p.warmup_iters + 1)
    if it > p.lr_decay_iters:
        return p.min_lr
    ratio = (it - p.warmup_iters) / max(1, p.lr_decay_iters - p.warmup_iters)
    return p.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (p.learning_rate - p.min_lr)


# How an optimizer runs rather than what it learns: a checkpoint written by the eager step resumes in the
# CUDA-graph step (fused, capturable, the learning rate a device tensor) and the other way round.
RUNTIME_KEYS = ("lr", "fused", "foreach", "capturable", "differentiable")


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state dict for a checkpoint, with a tensor learning rate (the graphed step's)
    written as a float, so a checkpoint reads the same whichever step wrote it."""
    state = optimizer.state_dict()  # param_groups are fresh dicts: changing them leaves the optimizer alone
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's moments, step counts and hyperparameters, keeping this optimizer's RUNTIME_KEYS
    (torch's load_state_dict would take them from the checkpoint too). They go into the loaded groups
    before loading, so torch places the step counts by this optimizer's policy (a capturable or fused
    one keeps them as float32 on the parameters' device) rather than by the checkpoint's."""
    own = [{k: group[k] for k in RUNTIME_KEYS if k in group} for group in optimizer.param_groups]
    if len(state["param_groups"]) != len(own):
        raise ValueError(
            f"optimizer state has {len(state['param_groups'])} parameter groups, this optimizer {len(own)}"
        )
    state = {**state, "param_groups": [{**group, **keep} for group, keep in zip(state["param_groups"], own)]}
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, own):
        group.update(keep)  # a tensor learning rate stays this optimizer's own tensor


def model_config(params: Params, vocab_size: int) -> GPTConfig:
    m = params.model
    return GPTConfig(
        block_size=m.block_size,
        vocab_size=vocab_size,
        n_layer=m.n_layer,
        n_head=m.n_head,
        n_embd=m.n_embd,
        dropout=m.dropout,
        bias=m.bias,
    )


@dataclass
class TrainResult:
    best_val_loss: float
    best_iter: int
    iterations: int
    tokens_per_sec: float
    ms_per_iter: float
    device: str
    dtype: str
    world_size: int
    n_params: int
    history: list[dict] = field(default_factory=list)
    checkpoint: str = ""
    train_losses: list[float] = field(default_factory=list)  # every iteration's training loss, this run


@dataclass
class RunState:
    """What a run carries from one iteration to the next: the model and its optimizer and GradScaler, the
    generator the training batches are drawn from, the iteration, the best validation loss so far (and
    where) and the evaluations. `to_checkpoint` saves it with the RNG states, `restore` continues one."""

    model: GPT  # as built: neither compiled nor wrapped in DDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the training batches' offsets
    iteration: int = 0
    best_val_loss: float = float("inf")
    best_iter: int = -1
    history: list[dict] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def record(self, losses: dict[str, float], lr: float) -> bool:
        """Add this iteration's evaluation to the history; True when its validation loss is the best yet."""
        it = self.iteration
        self.history.append({"iter": it, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr})
        if losses["val"] < self.best_val_loss:
            self.best_val_loss, self.best_iter = losses["val"], it
            return True
        return False

    def to_checkpoint(self, about: dict) -> dict:
        """The checkpoint of this state; `about` says what made it (params, data, tokenizer, MLflow run)."""
        cuda = self.device.type == "cuda"
        return {
            "model_args": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": optimizer_state(self.optimizer),
            "scaler": self.scaler.state_dict(),
            "iter_num": self.iteration,
            "best_val_loss": self.best_val_loss,
            "best_iter": self.best_iter,
            "history": self.history,
            **about,
            "rng": {
                "data": self.generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if cuda else torch.empty(0),
            },
        }

    def restore(self, ck: dict) -> None:
        """Continue from a checkpoint of `to_checkpoint`: weights, optimizer, scaler, counters, RNG states."""
        self.model.load_state_dict(ck["model"])
        load_optimizer_state(self.optimizer, ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        self.iteration, self.best_val_loss, self.best_iter = ck["iter_num"], ck["best_val_loss"], ck["best_iter"]
        self.history = ck["history"]
        # RNG states are CPU byte tensors, whatever map_location moved the checkpoint to.
        rng = {name: state.cpu() for name, state in ck["rng"].items()}
        self.generator.set_state(rng["data"])
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"].numel():
            torch.cuda.set_rng_state(rng["cuda"], self.device)


class Trainer:
    def __init__(self, params: Params, root: Path, dist_info: Dist | None = None):
        self.params = params
        self.p = params.train
        self.root = root
        self.d = dist_info or Dist.from_env()
        self.device = resolve_device(
            self.p.device, "train.device", self.d.local_rank if self.d.world_size > 1 else None
        )
        if self.p.backend == "cutile":
            require_cutile(self.device)
        self.dtype = resolve_dtype(self.p.dtype, self.device)
        if self.p.cuda_graph:
            self.check_cuda_graph()
        if self.dtype != torch.float32 and self.device.type != "cuda":
            raise ParamsError(
                f"train.dtype: {self.p.dtype} autocast needs a CUDA device, training runs on "
                f"{self.device}; use dtype auto or float32"
            )

        data_dir = root / params.data.out_dir
        self.tokenizer = load_tokenizer(data_dir)
        self.train_data = gdata.load_split(data_dir, "train")
        self.val_data = gdata.load_split(data_dir, "val")
        self.data_sha256 = gdata.data_sha256(data_dir)
        for split, arr in (("train", self.train_data), ("val", self.val_data)):
            if len(arr) <= params.model.block_size:
                raise ParamsError(
                    f"model.block_size: {params.model.block_size} is not shorter than the {split} "
                    f"split ({len(arr)} tokens); lower block_size or use a larger corpus"
                )
        world = self.d.world_size
        if self.p.gradient_accumulation_steps % world:
            raise ParamsError(
                f"train.gradient_accumulation_steps: {self.p.gradient_accumulation_steps} must be a "
                f"multiple of the number of processes ({world}): it counts micro-batches of the "
                "global batch"
            )
        self.micro_steps = self.p.gradient_accumulation_steps // world
        self.tokens_per_iter = self.p.gradient_accumulation_steps * self.p.batch_size * params.model.block_size
        self.out_dir = root / self.p.out_dir
        self.config = model_config(params, self.tokenizer.vocab_size)
        check_fits(self.config, self.p.batch_size, self.device, self.dtype)  # before the model is allocated
        # Everything that can fail is checked here, before anything is written: the resume state too.
        self.resume_state = self.load_resume_state() if self.p.resume else None
        self.run_id: str | None = None  # the MLflow run, written into the checkpoints (a resumed run links to it)
        self.improved = False  # whether the finished run replaced ckpt.pt with a better checkpoint

    @property
    def resumed_run_id(self) -> str | None:
        """The MLflow run that wrote the checkpoint this run resumes, when it recorded one."""
        return self.resume_state.get("mlflow_run_id") if self.resume_state else None

    def load_resume_state(self) -> dict:
        path = self.out_dir / LAST_CHECKPOINT
        if not path.is_file():
            raise CheckpointError(
                f"train.resume: true, but {path} does not exist: there is no run to continue "
                "(set train.resume: false to start afresh)"
            )
        ck = load_checkpoint(path, map_location=self.device)
        if ck.get("model_args") != self.config.to_dict():
            raise ParamsError(
                f"train.resume: {path} was trained with model {ck.get('model_args')}, params ask for "
                f"{self.config.to_dict()}"
            )
        return ck

    @property
    def staged(self) -> Path:
        return self.out_dir / STAGED_CHECKPOINT

    def promote_best(self) -> bool:
        """At the end of a run, its best checkpoint replaces ckpt.pt (the stage then writes the manifest
        beside it). False when the run found none better (a resumed run that did not improve)."""
        if not self.staged.is_file():
            return False
        try:
            os.replace(self.staged, self.out_dir / BEST_CHECKPOINT)
        except OSError as e:
            raise output_error(self.out_dir / BEST_CHECKPOINT, e) from e
        return True

    def remove_leftovers(self) -> None:
        """Remove what an earlier run in this folder left unfinished (the stage's lock says none is running):
        the temp files of writes it was killed in, and its staged best unless this run resumes that run."""
        best = self.out_dir / BEST_CHECKPOINT
        for target in (self.staged, self.out_dir / LAST_CHECKPOINT, manifest_path(best)):
            for tmp in partial_writes(target):
                remove(tmp)
                print(f"note: removed {tmp}: a write of {target.name} that never finished (its run was killed)")
        why = self.foreign_staged() if self.staged.is_file() else None
        if why:
            remove(self.staged)
            print(f"note: removed {self.staged}: {why}")

    def foreign_staged(self) -> str | None:
        """Why the staged checkpoint is not this run's best so far, or None when it is (a resumed run's)."""
        if self.resume_state is None:
            return "the best checkpoint of an earlier run that did not finish, never promoted (this run starts afresh)"
        best_iter, best_loss = self.resume_state["best_iter"], self.resume_state["best_val_loss"]
        try:
            staged = load_checkpoint(self.staged, verify=False)
        except CheckpointError:
            staged = {}
        if staged.get("iter_num") == best_iter and staged.get("best_val_loss") == best_loss:
            return None
        return f"not the best checkpoint (iteration {best_iter}) of the run {LAST_CHECKPOINT} continues"

    def check_cuda_graph(self) -> None:
        """What train.cuda_graph needs that params.yaml alone cannot tell (compile and an explicit float16
        are refused when the params are loaded; `auto` can resolve to float16)."""
        if self.device.type != "cuda":
            raise ParamsError(
                f"train.cuda_graph: true needs a CUDA device, training runs on {self.device} "
                f"(train.device: {self.p.device}); set train.cuda_graph: false"
            )
        if self.d.world_size > 1:
            raise ParamsError(
                f"train.cuda_graph: true runs one process, this launch has {self.d.world_size} "
                "(the DDP gradient all-reduce is not captured); set train.cuda_graph: false"
            )
        refusal = cuda_graph_refusal(dtype_name(self.dtype))
        if refusal:
            raise ParamsError(
                f"train.cuda_graph: true cannot run with train.dtype: {self.p.dtype}, which is "
                f"{dtype_name(self.dtype)} on this GPU ({refusal}); set train.dtype: float32 or train.cuda_graph: false"
            )

    # ---- pieces -------------------------------------------------------------------------------------
    def draw_batches(self, data: np.ndarray, count: int, generator: torch.Generator):
        """`count` micro-batches' offsets from one generator: (count, batch_size)."""
        T = self.params.model.block_size
        return torch.randint(len(data) - T, (count, self.p.batch_size), generator=generator)

    def to_batch(self, data: np.ndarray, offsets: torch.Tensor):
        return gdata.batch_at(data, offsets, self.params.model.block_size, self.device)

    @torch.no_grad()
    def evaluate(self, model: GPT, it: int) -> dict[str, float]:
        """Mean loss over eval_iters batches per split, drawn from a generator seeded by the iteration so
        every process, and a resumed run, evaluates on the same batches."""
        model.eval()
        out = {}
        for split, data in (("train", self.train_data), ("val", self.val_data)):
            g = torch.Generator().manual_seed(self.p.seed * 1_000_003 + it)
            offsets = self.draw_batches(data, self.p.eval_iters, g)
            losses = []
            for row in offsets:
                x, y = self.to_batch(data, row)
                with autocast(self.device, self.dtype):
                    _, loss = model(x, y)
                losses.append(loss.item())
            out[split] = float(np.mean(losses))
        model.train()
        return out

    def checkpoint_about(self) -> dict:
        """What a checkpoint says about the run that wrote it, beside its state."""
        return {
            "params": self.params.model_dump(),
            "data_sha256": self.data_sha256,
            "tokenizer": self.tokenizer.to_json(),  # decoding needs nothing else
            "mlflow_run_id": self.run_id,
        }

    def start_state(self) -> RunState:
        """A fresh run's state (the same initial weights on every process), or the one last.pt saved."""
        p, d = self.p, self.d
        torch.manual_seed(p.seed)
        model = build_model(self.config, p.backend).to(self.device)
        optimizer = model.configure_optimizers(
            p.weight_decay, p.learning_rate, (p.beta1, p.beta2), self.device.type, capturable=p.cuda_graph
        )
        state = RunState(model, optimizer, grad_scaler(self.device, self.dtype), torch.Generator().manual_seed(p.seed))
        if self.resume_state is not None:
            state.restore(self.resume_state)
        if d.master:
            self.remove_leftovers()
        # Dropout masks differ per process, as in any data-parallel run; seeds offset by rank.
        if d.rank and not p.resume:
            torch.manual_seed(p.seed + d.rank)
        return state

    def make_step(self, state: RunState) -> TrainStep:
        """The run's training step (gptcore.train_step): eager, compiled or replayed as a CUDA graph."""
        p = self.p
        return make_train_step(
            state.model,
            state.optimizer,
            mode="graph" if p.cuda_graph else "compile" if p.compile else "eager",
            dtype=self.dtype,
            micro_steps=self.micro_steps,
            batch_size=p.batch_size,
            block_size=self.params.model.block_size,
            grad_clip=p.grad_clip,
            scaler=state.scaler,
            distributed=self.d.world_size > 1,
            compile_mode="reduce-overhead" if p.compile == "reduce-overhead" else None,
        )

    def train_iteration(self, step: TrainStep, state: RunState, lr: float) -> float:
        """Draw the global batch's offsets, train on this process's micro-batches; the loss."""
        offsets = self.draw_batches(self.train_data, self.p.gradient_accumulation_steps, state.generator)
        mine = offsets[self.d.rank * self.micro_steps : (self.d.rank + 1) * self.micro_steps]
        x, y = self.to_batch(self.train_data, mine.reshape(-1))  # every micro-batch in one copy
        shape = (self.micro_steps, self.p.batch_size, self.params.model.block_size)
        return step.step(x.view(shape), y.view(shape), lr).item()  # also waits for the GPU: the time is real

    def evaluate_and_save(self, state: RunState, lr: float, bar: tqdm, on_eval) -> None:
        """Evaluate at this iteration; on the master, save last.pt (and the staged best when it improved)."""
        losses = self.evaluate(state.model, state.iteration)
        improved = state.record(losses, lr)
        if not self.d.master:
            return
        ck = state.to_checkpoint(self.checkpoint_about())
        if improved:
            save_checkpoint(ck, self.staged)
        try:
            save_checkpoint(ck, self.out_dir / LAST_CHECKPOINT)
        except BaseException:
            if improved:  # the staged best is now ahead of last.pt, so no resumed run could use it
                with suppress(OSError):
                    self.staged.unlink()
                    print(f"note: removed {self.staged}: {LAST_CHECKPOINT} was not written beside it")
            raise
        bar.write(f"iter {state.iteration}: train {losses['train']:.4f}, val {losses['val']:.4f}, lr {lr:.2e}")
        if on_eval:
            on_eval(state.iteration, losses, lr)

    def progress_bar(self, start: int) -> tqdm:
        return tqdm(
            total=self.p.max_iters,
            initial=start,
            disable=not self.d.master,
            desc="train",
            unit="it",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def show_speed(self, bar: tqdm, loss: float, step_ms: list[float]) -> float:
        """The loss and speed of the last log interval on the bar; returns the tokens/s."""
        steady = statistics.median(step_ms[-self.p.log_interval :])
        tokens_per_sec = self.tokens_per_iter / steady * 1000
        bar.set_postfix(loss=f"{loss:.4f}", ms_iter=f"{steady:.1f}", tok_s=f"{tokens_per_sec:,.0f}")
        return tokens_per_sec

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None, on_eval=None, on_log=None) -> TrainResult:
        """Train to max_iters (or stop after `stop_after` iterations, as an interruption would).

        `on_eval(it, losses, lr)` is called on the master process after each evaluation, `on_log(it, loss, lr,
        tokens_per_sec)` every `log_interval` iterations (this iteration's loss, the interval's speed).
        """
        p = self.p
        state = self.start_state()
        step = self.make_step(state)
        start = state.iteration
        end = p.max_iters if stop_after is None else min(p.max_iters, start + stop_after)
        step_ms: list[float] = []
        train_losses: list[float] = []
        with self.progress_bar(start) as bar:  # closed on an error too, so its message starts a line
            for it in range(start, end + 1):
                state.iteration = it
                lr = learning_rate(it, p)
                resumed_here = p.resume and it == start  # last.pt was saved after this evaluation
                if (it % p.eval_interval == 0 or it == p.max_iters) and not resumed_here:
                    self.evaluate_and_save(state, lr, bar, on_eval)
                if it == end:
                    break
                t0 = time.perf_counter()
                loss = self.train_iteration(step, state, lr)
                step_ms.append((time.perf_counter() - t0) * 1000)
                train_losses.append(loss)
                bar.update(1)
                if it % p.log_interval == 0 and self.d.master:
                    tokens_per_sec = self.show_speed(bar, loss, step_ms)
                    if on_log:
                        on_log(it, loss, lr, tokens_per_sec)
        if end == p.max_iters and self.d.master:
            self.improved = self.promote_best()
        return self.result(state, end, step_ms, train_losses)

    def result(self, state: RunState, end: int, step_ms: list[float], train_losses: list[float]) -> TrainResult:
        # Steady-state speed: skip the first steps (compilation, allocator warm-up) when there are enough.
        steady = step_ms[5:] if len(step_ms) > 10 else step_ms
        ms = statistics.median(steady) if steady else float("nan")
        return TrainResult(
            best_val_loss=state.best_val_loss,
            best_iter=state.best_iter,
            iterations=end,
            ms_per_iter=ms,
            tokens_per_sec=self.tokens_per_iter / ms * 1000 if steady else float("nan"),
            device=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            dtype=dtype_name(self.dtype),
            world_size=self.d.world_size,
            n_params=state.model.num_params(),
            history=state.history,
            checkpoint=str(self.out_dir / BEST_CHECKPOINT),
            train_losses=train_losses,
        )


def init_distributed(d: Dist) -> None:
    if d.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(d.local_rank)
        dist.init_process_group(backend=backend)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
