"""Training: the loss falls, resume ends where an uninterrupted run ends, torchrun agrees with one process."""

import io
import re
import sys

import pytest
import torch
from helpers import tiny_gpt
from pipeline_helpers import ROOT, run, tiny_params

from gptcore import data
from gptcore.checkpoint import load_checkpoint
from gptcore.params import ParamsError, cuda_graph_refusal
from gptcore.train import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    Trainer,
    learning_rate,
    load_optimizer_state,
    optimizer_state,
)
from gptcore.train_graph import GraphedTrainStep


def test_loss_falls_and_best_checkpoint_is_kept(root):
    result = Trainer(tiny_params(), root).run()
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"] - 0.5, result.history
    assert result.best_val_loss == min(h["val_loss"] for h in result.history)
    ck = load_checkpoint(root / "out" / BEST_CHECKPOINT)
    assert ck["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert ck["iter_num"] == result.best_iter
    assert ck["data_sha256"] == data.data_sha256(root / "data")
    assert ck["params"]["train"]["max_iters"] == 30
    assert set(ck) >= {"model_args", "model", "optimizer", "iter_num", "best_val_loss", "params"}
    assert not list((root / "out").glob("*.tmp"))  # atomic writes leave no temp files


def test_resume_ends_on_the_same_weights(root):
    params = tiny_params(model={"dropout": 0.1})  # dropout: the RNG state must be restored too
    Trainer(params, root).run()
    uninterrupted = load_checkpoint(root / "out" / LAST_CHECKPOINT)

    other = root / "other"
    other.mkdir()
    (other / "data").symlink_to(root / "data")
    Trainer(params, other).run(stop_after=20)  # "killed" after the evaluation at iteration 20
    assert load_checkpoint(other / "out" / LAST_CHECKPOINT)["iter_num"] == 20
    resumed = params.model_copy(update={"train": params.train.model_copy(update={"resume": True})})
    Trainer(resumed, other).run()
    final = load_checkpoint(other / "out" / LAST_CHECKPOINT)
    assert final["iter_num"] == uninterrupted["iter_num"] == 30
    for name, tensor in uninterrupted["model"].items():
        torch.testing.assert_close(final["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert [h["iter"] for h in final["history"]] == [h["iter"] for h in uninterrupted["history"]]


def test_run_state_saved_and_restored_continues_bit_identically(root):
    """A run's state written as a checkpoint and restored into a freshly built run (other weights, other RNG
    positions) continues exactly as the saved run goes on: weights, AdamW moments, batch and dropout RNG."""
    params = tiny_params(model={"dropout": 0.1}, train={"gradient_accumulation_steps": 2})
    trainer = Trainer(params, root)

    def train(state, step, iterations):
        return [trainer.train_iteration(step, state, learning_rate(it, params.train)) for it in iterations]

    state = trainer.start_state()
    step = trainer.make_step(state)
    train(state, step, range(3))
    state.iteration = 3
    assert state.record({"train": 3.0, "val": 2.5}, 1e-3)
    buffer = io.BytesIO()
    torch.save(state.to_checkpoint(trainer.checkpoint_about()), buffer)
    expected = train(state, step, range(3, 6))

    buffer.seek(0)
    ck = torch.load(buffer, weights_only=False)
    assert list(ck) == [
        "model_args",
        "model",
        "optimizer",
        "scaler",
        "iter_num",
        "best_val_loss",
        "best_iter",
        "history",
        "params",
        "data_sha256",
        "tokenizer",
        "mlflow_run_id",
        "rng",
    ]
    fresh = trainer.start_state()
    train(fresh, trainer.make_step(fresh), range(2))  # moves every RNG and the weights away from the saved ones
    fresh.restore(ck)
    assert (fresh.iteration, fresh.best_val_loss, fresh.best_iter) == (3, 2.5, 3)
    assert fresh.history == [{"iter": 3, "train_loss": 3.0, "val_loss": 2.5, "lr": 1e-3}]
    assert train(fresh, trainer.make_step(fresh), range(3, 6)) == expected
    for name, tensor in state.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], tensor), name
    for p_saved, p_fresh in zip(state.model.parameters(), fresh.model.parameters()):
        assert torch.equal(fresh.optimizer.state[p_fresh]["exp_avg_sq"], state.optimizer.state[p_saved]["exp_avg_sq"])


def test_learning_rate_schedule():
    p = tiny_params().train
    lrs = [learning_rate(i, p) for i in range(40)]
    assert lrs[0] < lrs[4] < p.learning_rate  # warmup
    assert lrs[5] == pytest.approx(p.learning_rate)
    assert all(a >= b for a, b in zip(lrs[5:30], lrs[6:31]))  # cosine decay
    assert lrs[35] == p.min_lr


def test_block_size_longer_than_val_split_is_refused(root):
    params = tiny_params(model={"block_size": 4096})
    with pytest.raises(ParamsError, match=r"model.block_size: 4096 is not shorter than the val split"):
        Trainer(params, root)


def test_cutile_backend_without_gpu_is_a_clear_error(root):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the cuTile backend can run")
    with pytest.raises(RuntimeError, match="backend 'cutile' cannot run"):
        Trainer(tiny_params(train={"backend": "cutile", "device": "cpu"}), root).run()


def test_cuda_graph_on_a_cpu_device_is_refused(root):
    with pytest.raises(ParamsError, match=r"train\.cuda_graph: true needs a CUDA device, training runs on cpu"):
        Trainer(tiny_params(train={"cuda_graph": True, "device": "cpu"}), root)


def test_graphed_step_and_capturable_optimizer_need_cuda():
    model = tiny_gpt(n_head=1)
    with pytest.raises(ValueError, match="capturable optimizer needs the parameters on a CUDA device"):
        model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", capturable=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        GraphedTrainStep(
            model,
            model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"),
            dtype=torch.float32,
            micro_steps=1,
            batch_size=2,
            block_size=16,
            grad_clip=1.0,
        )


def test_float16_cuda_graph_refusals_state_one_rule():
    """params.yaml, the Trainer and the graphed step refuse float16 with the reason of one function."""
    reason = cuda_graph_refusal("float16")
    assert reason and cuda_graph_refusal("bfloat16") is None and cuda_graph_refusal("float32") is None
    with pytest.raises(ParamsError, match=r"train\.cuda_graph: .*train\.dtype: float16 \(" + re.escape(reason)):
        tiny_params(train={"cuda_graph": True, "dtype": "float16"})
    model = tiny_gpt(n_head=1)
    with pytest.raises(ValueError, match="the graphed step cannot run in float16: " + re.escape(reason)):
        GraphedTrainStep(
            model,
            model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu"),
            dtype=torch.float16,
            micro_steps=1,
            batch_size=2,
            block_size=16,
            grad_clip=1.0,
        )


def test_optimizer_state_moves_between_the_eager_and_the_graphed_step():
    """The graphed step's optimizer is fused and capturable with its learning rate a device tensor. A
    checkpoint holds the rate as a float, and loading keeps how the loading optimizer runs, so a checkpoint
    written by either step resumes in either (on a GPU: tests/test_train_graph_gpu.py)."""
    model = tiny_gpt(n_head=1)
    x = torch.randint(40, (2, 16))
    eager = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model(x, x)[1].backward()
    eager.step()

    # What the graphed step's optimizer holds (built on CPU here: capturable AdamW only steps on a GPU).
    lr = torch.tensor(2e-3)
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in eager.param_groups]
    graphed = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), fused=True, capturable=True)
    load_optimizer_state(graphed, optimizer_state(eager))
    assert all(g["lr"] is lr and g["capturable"] and g["fused"] for g in graphed.param_groups)
    assert [g["weight_decay"] for g in graphed.param_groups] == [0.1, 0.0]
    p0 = eager.param_groups[0]["params"][0]
    torch.testing.assert_close(graphed.state[p0]["exp_avg"], eager.state[p0]["exp_avg"])

    saved = optimizer_state(graphed)
    assert all(type(g["lr"]) is float and g["lr"] == pytest.approx(2e-3) for g in saved["param_groups"])
    assert torch.is_tensor(graphed.param_groups[0]["lr"])  # saving leaves the optimizer's tensor alone
    saved["param_groups"][0]["lr"] = torch.tensor(2e-3)  # a tensor rate, as torch alone would have saved it
    again = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    load_optimizer_state(again, saved)
    assert all(g["lr"] == 1e-3 and not g["capturable"] and not g["fused"] for g in again.param_groups)
    model(x, x)[1].backward()
    again.step()  # the eager CPU step runs on the state the "graphed" optimizer saved
    assert int(again.state[p0]["step"]) == 2


@pytest.mark.slow
def test_two_gloo_processes_agree_with_one(root, tmp_path_factory):
    """torchrun with 2 processes, each one micro-batch, matches 1 process accumulating 2 micro-batches."""
    import yaml
    from pipeline_helpers import tiny_params_dict

    raw = tiny_params_dict(train={"gradient_accumulation_steps": 2, "max_iters": 10, "device": "cpu"})
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    one = root / "one"
    one.mkdir()
    (one / "data").symlink_to(root / "data")
    (one / "params.yaml").write_text(yaml.safe_dump(raw))
    Trainer(tiny_params(train={"gradient_accumulation_steps": 2, "max_iters": 10, "device": "cpu"}), one).run()

    two = root / "two"
    two.mkdir()
    (two / "data").symlink_to(root / "data")
    (two / "params.yaml").write_text(yaml.safe_dump(raw))
    env_cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "stages" / "train.py"),
    ]
    env = {
        "DVC_ROOT": str(two),
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{two}/mlflow.db",
        "OMP_NUM_THREADS": "1",
    }
    import os

    run(env_cmd, two, env={**os.environ, **env}, timeout=600)
    a = load_checkpoint(one / "out" / LAST_CHECKPOINT)["model"]
    b = load_checkpoint(two / "out" / LAST_CHECKPOINT)["model"]
    for name in a:
        x, y = b[name], a[name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias shifts every score of a row equally, so softmax makes its true gradient zero;
            # Adam turns the rounding noise left there into full-size steps whose sign depends on the
            # summation order. Compare the query and value biases, which carry real gradients.
            n = x.numel() // 3
            x, y = torch.cat([x[:n], x[2 * n :]]), torch.cat([y[:n], y[2 * n :]])
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    import json

    manifest = json.loads((two / "out" / "ckpt.json").read_text())
    assert manifest["world_size"] == 2
