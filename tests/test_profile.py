"""The step profile: kernels sorted into categories by name, the table's arithmetic (shares, matmul TFLOP/s,
MFU against the datasheet peak), nanoGPT's FLOP count, and a real profile of the torch step on a CPU."""

import json
import sys

import pytest
import torch
from pipeline_helpers import env_for, make_project, run

from gptcore.bench import model as model_bench
from gptcore.bench import profile
from gptcore.model import GPT, GPTConfig

# Kernel names as the CUDA profiler reports them (PyTorch's templates, cuBLAS, cuTile's function names).
NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
    "kernel__5x_cublas": "matmul",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTT": "matmul",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
    "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)": "elementwise",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
    "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}>": "casts and copies",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<c10::BFloat16, at::native::func_wrapper_t<"
    "float, at::native::sum_functor<c10::BFloat16, float, float>::operator()>, unsigned int, c10::BFloat16, 4> >"
    "": "reductions",
    "void at::native::(anonymous namespace)::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
    "at::native::GeluType)::{lambda()#2}": "gelu",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>": "layernorm",
    "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel<float, float>": "layernorm",
    "ln_fwd_kernel_body": "layernorm",
    "ln_colsum_kernel_body": "layernorm",
    "attn_bwd_dkdv_kernel_body": "attention",
    "adl_fwd_kernel_body": "layernorm",  # the fused residual add + dropout + LayerNorm
    "adl_bwd_kernel_body": "layernorm",
    "gelu_bwd_kernel_body": "gelu",
    "ce_fwd_kernel_body": "cross-entropy",
    "ce_grad_kernel_body": "cross-entropy",  # the fused LM head's loss-and-gradient kernel
    "colsum_kernel_body": "reductions",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<2>, CopyFunctor<"
    "c10::BFloat16, float, c10::BFloat16, 1, 1, 1>>": "optimizer",  # the half weight copies, with the step
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4> >": "attention",
    "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float, unsigned int, 1, 4>": (
        "dropout"
    ),
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
    "void (anonymous namespace)::softmax_warp_forward<float, float, float, 7, true, false>": "cross-entropy",
    "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": (
        "cross-entropy"
    ),
    "void at::native::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>": "embedding",
    "aten::_scaled_dot_product_attention_math": "attention",
    "aten::_safe_softmax": "attention",
    "aten::_log_softmax_backward_data": "cross-entropy",
    "aten::addmm": "matmul",
    "aten::view": "other",
}


@pytest.mark.parametrize("name,expected", list(NAMES.items()))
def test_kernels_fall_into_their_categories(name, expected):
    assert profile.category(name) == expected


def test_the_table_adds_up_and_reports_tflops_and_mfu():
    kernels = {
        "nvjet_a": {"ms": 2.0, "count": 10},
        "nvjet_b": {"ms": 1.0, "count": 5},
        "ln_fwd_kernel_body": {"ms": 0.5, "count": 12},
        "vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>": {"ms": 0.5, "count": 3},
    }
    flops = profile.StepFlops(matmul=3e12, attention=1e12)
    table = profile.category_table(kernels, flops, "NVIDIA H200")
    assert list(table["categories"]) == ["matmul", "layernorm", "elementwise"]  # largest first
    assert table["categories"]["matmul"] == {"ms": 3.0, "kernels": 15, "share": 0.75}
    assert table["total_ms"] == 4.0 and table["kernels"] == 30
    assert table["matmul_tflops"] == pytest.approx(1000.0)  # 3 TFLOP in 3 ms
    assert table["mfu"] == pytest.approx(4e12 / 4e-3 / 989.4e12) and table["peak_tflops"] == 989.4
    assert "mfu" not in profile.category_table(kernels, flops, "cpu")  # no datasheet peak: no figure
    shown = profile.format_table("cutile", table)
    assert "4.000 ms of kernel time per step in 30 kernels" in shown and "MFU 101.1%" in shown


def test_step_flops_are_nanogpts():
    config = GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)
    model = GPT(config)
    tokens = 64 * 256
    nanogpt = (6 * model.num_params() + 12 * 6 * 384 * 256) * tokens  # nanoGPT's estimate_mfu
    assert profile.StepFlops.of(config, 64).total == pytest.approx(nanogpt, rel=0.005)  # less the LN and biases


def test_a_cpu_profile_of_the_torch_step():
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    checkpoint = {"model_args": config.to_dict(), "model": GPT(config).state_dict()}
    profiles = model_bench.step_profiles(checkpoint, 4, torch.float32, ["torch", "cutile"], torch.device("cpu"), "cpu")
    assert "CUDA GPU" in profiles["cutile"]["skipped"]
    table = profiles["torch"]
    for name in ("matmul", "layernorm", "attention", "gelu", "dropout", "cross-entropy", "embedding"):
        assert table["categories"][name]["ms"] > 0 and table["categories"][name]["kernels"] > 0, name
    assert table["total_ms"] == pytest.approx(sum(c["ms"] for c in table["categories"].values()))
    assert sum(c["share"] for c in table["categories"].values()) == pytest.approx(1.0)
    assert table["matmul_tflops"] > 0 and table["shape"] == "B4xT32"


@pytest.mark.slow
def test_bench_profile_on_cpu(tmp_path):
    proj = make_project(tmp_path / "proj", bench={"model_batch": 2})
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=32)
    (proj / "out").mkdir()
    torch.save({"model_args": config.to_dict(), "model": GPT(config).state_dict()}, proj / "out" / "ckpt.pt")
    env = {**env_for(proj), "GPTCORE_MLFLOW": "off"}
    out = run([sys.executable, "stages/bench.py", "--profile"], proj, env=env)
    assert "torch: " in out.stdout and "ms of kernel time per step" in out.stdout and "matmul" in out.stdout
    assert "cutile: not profiled: no CUDA GPU" in out.stdout
    saved = json.loads((proj / "bench" / "records.json").read_text())
    assert saved["records"] == {} and saved["profiles"]["torch"]["total_ms"] > 0  # the profile only
    metrics = json.loads((proj / "metrics" / "bench.json").read_text())
    assert metrics["torch_kernel_ms"] > 0 and "cutile_kernel_ms" not in metrics
    bad = run([sys.executable, "stages/bench.py", "--profile", "--cases", "train"], proj, check=False, env=env)
    assert bad.returncode == 2 and "--profile is --cases profile" in bad.stderr


def test_a_user_annotation_is_not_counted_as_a_kernel():
    """Ranges like Optimizer.step#AdamW.step lie on the timeline beside the kernels they hold: counting them would
    count that time twice."""

    def step():
        with torch.profiler.record_function("aten::looks_like_an_op"):
            (torch.ones(64, 64) @ torch.ones(64, 64)).sum()

    kernels = profile.kernel_times(step, torch.device("cpu"), steps=1)
    assert "aten::mm" in kernels and "aten::looks_like_an_op" not in kernels
