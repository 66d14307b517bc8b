"""train.cuda_graph on a GPU: the step captured as a CUDA graph trains as the eager step does (reference
and cuTile model), checkpoints written by either step resume in either, and replays draw fresh dropout
masks. Skipped with the reason where there is no CUDA GPU (tests/conftest.py).

Tolerances. Both runs launch the same kernels on the same data under bf16 autocast; the graphed one
differs only in where the work is issued (a side stream, a graph), in autocast's cast cache (off; the
casts are the same) and in the learning rate being read from a float32 device tensor where the eager
step passes a Python float (at most the fp32 rounding of the rate apart). What can still differ is the
summation order of kernels that use atomics, at the level of fp32 rounding (~1e-7 relative), which bf16
rounding of activations can lift to ~4e-3 of one element now and then. Hence:
- losses, each iteration's and each evaluation's: within 1e-3 relative (bf16 keeps 8 bits, ~4e-3 per
  element; a loss averages 2 x 8 x 16 positions, so such flips move it far less than 1e-3);
- weights after the run: rtol 1e-2, atol 1e-3 (Adam moves every weight by up to lr = 3e-3 a step
  whatever its gradient's size, so a gradient difference of rounding size shows up at 1e-4..1e-3);
  the attention key bias is left out as in test_train's DDP test: its true gradient is zero (softmax
  ignores a shift shared by a row's scores), so Adam turns rounding noise into lr-sized steps of either
  sign.
"""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import tiny_params

from gptcore import kernels
from gptcore.bench.model import train_step_rows
from gptcore.bench.timing import Recorder, Timer
from gptcore.checkpoint import load_checkpoint
from gptcore.model import GPT, GPTConfig
from gptcore.train import LAST_CHECKPOINT, Trainer, load_optimizer_state, optimizer_state
from gptcore.train_graph import WARMUP_STEPS, GraphedTrainStep

pytestmark = pytest.mark.gpu

ITERS = 12
LOSS_REL = 1e-3
WEIGHT_RTOL, WEIGHT_ATOL = 1e-2, 1e-3


@pytest.fixture
def replays(monkeypatch):
    """Counts CUDA graph replays, to know the graphed runs really replayed a graph."""
    count: list[int] = []
    original = torch.cuda.CUDAGraph.replay

    def replay(self):
        count.append(1)
        return original(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", replay)
    return count


def require_backend(backend: str) -> None:
    if backend == "cutile":
        reason = kernels.cutile_unavailable()
        if reason:
            pytest.skip(reason)


def graph_params(backend: str = "torch", cuda_graph: bool = True, **train):
    """The tiny project (head dim 32, the cuTile kernel's smallest) with the settings of the brief: bf16,
    dropout 0, two micro-batches, gradient clipping at 1.0."""
    return tiny_params(
        model={"dropout": 0.0},
        train={
            "backend": backend,
            "device": "cuda",
            "dtype": "bfloat16",
            "cuda_graph": cuda_graph,
            "gradient_accumulation_steps": 2,
            "grad_clip": 1.0,
            "max_iters": ITERS,
            "lr_decay_iters": ITERS,
            "warmup_iters": 3,
            "eval_interval": 4,
            "eval_iters": 2,
            **train,
        },
    )


def train_in(root, name: str, params, **run):
    """Train in root/name (sharing root's data); the result and the last checkpoint."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    if not (folder / "data").exists():
        (folder / "data").symlink_to(root / "data")
    result = Trainer(params, folder).run(**run)
    return result, load_checkpoint(folder / "out" / LAST_CHECKPOINT)


def assert_same_weights(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        g = got[name]
        if name.endswith("attn.c_attn.bias"):  # keep the query and value biases: the key bias's gradient is 0
            n = r.numel() // 3
            g, r = torch.cat([g[:n], g[2 * n :]]), torch.cat([r[:n], r[2 * n :]])
        torch.testing.assert_close(g, r, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL, msg=name)


@pytest.mark.parametrize("backend", ["torch", "cutile"])
def test_graphed_training_matches_eager(root, backend, replays):
    require_backend(backend)
    eager, eager_ck = train_in(root, "eager", graph_params(backend, cuda_graph=False))
    assert not replays
    graph, graph_ck = train_in(root, "graph", graph_params(backend))
    assert len(replays) == ITERS - WARMUP_STEPS  # eager warm-up steps, then one replay per iteration

    assert len(graph.train_losses) == len(eager.train_losses) == ITERS
    for it, (g, e) in enumerate(zip(graph.train_losses, eager.train_losses)):
        assert g == pytest.approx(e, rel=LOSS_REL), f"iteration {it}: graphed {g}, eager {e}"
    assert graph.train_losses[-1] < graph.train_losses[0]  # and it trains
    assert [h["iter"] for h in graph.history] == [h["iter"] for h in eager.history] == [0, 4, 8, 12]
    for g, e in zip(graph.history, eager.history):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=LOSS_REL), (g, e)
        assert g["val_loss"] == pytest.approx(e["val_loss"], rel=LOSS_REL), (g, e)
    assert_same_weights(graph_ck["model"], eager_ck["model"])


@pytest.mark.parametrize("setting", [True, "reduce-overhead"])
def test_compiled_cutile_training_matches_eager(root, setting):
    """train.compile with the cuTile model (0 graph breaks: the kernels are custom operators under tracing),
    in Inductor's default mode and in reduce-overhead (its CUDA graphs): the losses of the eager run. Inductor
    fuses the ops around the kernels into other kernels than eager's, so the rounding differs a little more."""
    require_backend("cutile")
    eager, _ = train_in(root, "eager", graph_params("cutile", cuda_graph=False))
    compiled, _ = train_in(root, f"compiled-{setting}", graph_params("cutile", cuda_graph=False, compile=setting))
    assert len(compiled.train_losses) == ITERS
    for it, (c, e) in enumerate(zip(compiled.train_losses, eager.train_losses)):
        assert c == pytest.approx(e, rel=1e-2), f"iteration {it}: compiled {c}, eager {e}"
    assert compiled.train_losses[-1] < compiled.train_losses[0]


@pytest.mark.parametrize(
    "first,then",
    [(True, True), (True, False), (False, True)],
    ids=["graph-then-graph", "graph-then-eager", "eager-then-graph"],
)
def test_resume_across_the_eager_and_the_graphed_step(root, first, then):
    """Interrupted after the evaluation at iteration 8 and resumed (in the same or the other mode), a run
    ends where the uninterrupted run ends."""
    iters = {"max_iters": 16, "lr_decay_iters": 16}
    _, full = train_in(root, "full", graph_params(cuda_graph=first, **iters))

    _, ck = train_in(root, "part", graph_params(cuda_graph=first, **iters), stop_after=8)
    assert ck["iter_num"] == 8
    # The learning rate is written as a float in either mode (the graphed optimizer holds a device tensor).
    assert all(type(g["lr"]) is float for g in ck["optimizer"]["param_groups"])

    result, final = train_in(root, "part", graph_params(cuda_graph=then, resume=True, **iters))
    assert final["iter_num"] == full["iter_num"] == 16 and len(result.train_losses) == 8
    assert [h["iter"] for h in final["history"]] == [h["iter"] for h in full["history"]]
    assert final["history"][-1]["val_loss"] == pytest.approx(full["history"][-1]["val_loss"], rel=LOSS_REL)
    assert_same_weights(final["model"], full["model"])


def test_cpu_optimizer_state_loads_into_a_capturable_optimizer():
    """An optimizer state whose step counts are CPU tensors (an eager CPU run's, loaded without moving it)
    goes into a capturable CUDA AdamW with its step counts on the GPU, so the captured step can run."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32))
    x = torch.randint(40, (2, 16))
    eager = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model(x, x)[1].backward()
    eager.step()
    state = optimizer_state(eager)
    assert all(s["step"].device.type == "cpu" for s in state["state"].values())

    model.cuda()
    graphed = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cuda", capturable=True)
    load_optimizer_state(graphed, state)
    steps = [graphed.state[p]["step"] for g in graphed.param_groups for p in g["params"]]
    assert steps and all(s.device.type == "cuda" and int(s) == 1 for s in steps)
    model(x.cuda(), x.cuda())[1].backward()
    graphed.step()  # capturable AdamW refuses step counts off the parameters' device
    assert all(int(s) == 2 for s in steps)


def test_cpu_checkpoint_resumes_in_the_graphed_step(root):
    """A run trained eagerly on the CPU (its optimizer neither fused nor capturable, step counts on the
    CPU) resumes on the GPU in the graphed step and trains on from where it stopped."""
    iters = {"max_iters": 16, "lr_decay_iters": 16}
    cpu = graph_params(cuda_graph=False, device="cpu", dtype="float32", **iters)
    _, ck = train_in(root, "part", cpu, stop_after=8)
    assert ck["iter_num"] == 8
    assert all(not g["capturable"] and not g["fused"] for g in ck["optimizer"]["param_groups"])

    result, final = train_in(root, "part", graph_params(cuda_graph=True, resume=True, **iters))
    assert final["iter_num"] == 16 and len(result.train_losses) == 8
    assert all(torch.isfinite(torch.tensor(result.train_losses)))
    steps = [s["step"] for s in final["optimizer"]["state"].values()]
    assert steps and all(int(s) == 16 for s in steps)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_replays_draw_fresh_dropout_masks(dropout):
    """At learning rate 0 (and no weight decay) the weights stay put, so replaying one batch repeats the
    loss without dropout and changes it with dropout: the masks come from the CUDA generator's advancing
    offset, not frozen into the graph."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=1, n_embd=32, dropout=dropout))
    model = model.cuda().train()
    optimizer = model.configure_optimizers(0.0, 0.0, (0.9, 0.99), "cuda", capturable=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = GraphedTrainStep(
        model,
        optimizer,
        dtype=torch.bfloat16,
        micro_steps=2,
        batch_size=4,
        block_size=16,
        grad_clip=1.0,
        warmup_steps=1,
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = torch.randint(40, (2, 4, 16), device="cuda", generator=g)
    ys = torch.randint(40, (2, 4, 16), device="cuda", generator=g)

    losses = [step.step(xs, ys, 0.0).item() for _ in range(4)]  # 1 eager warm-up, capture + 3 replays
    assert step.captured and all(torch.isfinite(torch.tensor(losses)))
    assert step.grad_norm is not None and bool(torch.isfinite(step.grad_norm)) and step.grad_norm.item() > 0
    if dropout == 0.0:
        # the same kernels on the same weights and batch; 1e-6 leaves room for summation order only
        assert losses[1:] == pytest.approx([losses[0]] * 3, rel=1e-6), losses
    else:
        assert len(set(losses)) == 4, losses
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


def test_bench_times_the_graphed_step():
    """bench's `+graph` train-step rows are measured (a capture failure would make them `skipped`)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=1, n_embd=32)
    checkpoint = {"model_args": config.to_dict(), "model": GPT(config).state_dict()}
    device = torch.device("cuda")
    rec = Recorder(device, Timer(device, 1, 2, 0.0), log=lambda _: None)
    train_step_rows(rec, checkpoint, 2, torch.bfloat16, ["torch", "cutile"], compile_setting=False)
    rows = {r["implementation"]: r for r in rec.records}
    assert rows["torch eager+graph"]["status"] == "ok" and rows["torch eager+graph"]["ms"] > 0, rows
    cutile = rows["cutile+graph"]
    if kernels.cutile_unavailable() is None:
        assert cutile["status"] == "ok" and cutile["ms"] > 0, cutile
    else:
        assert cutile["status"] == "skipped" and cutile["reason"], cutile
