"""Verification on the CPU: PyTorch test doubles stand in for the cuTile kernels through the candidate
seam. A clean double passes every level; noise in one op makes the levels that see that op fail; without
a GPU the cuTile levels are skipped with the reason and the compile gate is reported."""

import json
import math
import sys

import pytest
import torch
from pipeline_helpers import ROOT, run, tiny_params, write_corpus
from test_transplant import stage_env, stage_project

from gptcore import data
from gptcore import tokenizer as tok
from gptcore.params import VerifyParams
from gptcore.train import Trainer
from gptcore.transplant import check_weights, transplant
from gptcore.verify import FAIL, PASS, SKIPPED, Candidate, metrics, render, torch_candidate, verify
from gptcore.verify.common import torch_attention, torch_layer_norm
from gptcore.verify.gate import model_jobs

# Small enough for the CPU: L1 at the model's shape (2 heads x 32) and at head dim 64 (width 64), lengths
# 1, 13, 16 (the block) and 40, bf16 kernels (+ fp32 LayerNorm); the model levels in float32, where a
# clean double agrees with the reference to ~1e-7 and greedy streams cannot flip on rounding.
FAST = dict(
    dtypes=["bfloat16"],
    seq_lens=[1, 13, 40],
    widths=[64],
    model_dtype="float32",
    decode_dtype="float32",
    batches=1,
    batch_size=2,
    num_prompts=3,
    prompt_len=8,
    decode_tokens=12,
    compile_archs=[],
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained briefly (confident enough that greedy decoding has clear winners), transplanted."""
    root = tmp_path_factory.mktemp("verify")
    write_corpus(root / "corpus.txt")
    data.prepare("corpus.txt", root / "data", 0.1, root=root)
    # 1 head x 32 (a head dim the kernels support); 150 steps at a high learning rate (~10 s): the model
    # then writes context-dependent text, so a broken op changes what greedy decoding picks
    Trainer(
        tiny_params(
            model={"n_head": 1},
            train={"max_iters": 150, "lr_decay_iters": 150, "eval_interval": 50, "learning_rate": 1e-2, "min_lr": 1e-3},
        ),
        root,
    ).run()
    vocab = tok.load(root / "data")
    transplant(root / "out" / "ckpt.pt", root / "cutile", vocab.vocab_size)
    weights = check_weights(root / "cutile", vocab.vocab_size)
    return root, weights, data.load_split(root / "data", "val"), vocab


def run_levels(trained, candidate, **overrides):
    _, weights, val, vocab = trained
    return verify(
        weights, val, VerifyParams(**{**FAST, **overrides}), candidate=candidate, device="cpu", decode=vocab.decode
    )


def by_name(v):
    return {r.name: r for r in v.results}


def test_clean_double_passes_every_level(trained):
    v = run_levels(trained, torch_candidate())
    levels = by_name(v)
    assert {n: levels[n].status for n in ("L1", "L2", "L3", "L4", "L5")} == dict.fromkeys(
        ("L1", "L2", "L3", "L4", "L5"), PASS
    ), {n: r.reason for n, r in levels.items()}
    assert levels["compile"].status == SKIPPED and "switched off" in levels["compile"].reason
    assert v.status == "incomplete"  # a skipped check never makes the whole run a pass

    l1 = levels["L1"].figures
    # 2 shapes x (4 lengths + 2 extremes), and dropout 0.1 and 0.2 at the model's shape x 4 lengths
    assert l1["attention.cases"] == 2 * 6 + 2 * 4 and l1["layer_norm.failed"] == 0
    assert l1["attention.fwd_err_max"] < 1e-2 and l1["layer_norm.grad_err_max"] < 5e-2
    # the decode step's kernels: 5 linear chains + GPT-2's head at 1 and 64 rows; attention at 3 positions x 2
    # batches in the model's cache and GPT-2's
    assert l1["decode_linear.cases"] == 12 and l1["decode_attention.cases"] == 12
    assert l1["decode_linear.failed"] == l1["decode_attention.failed"] == 0
    assert levels["L2"].figures["stack_max_err"] < 1e-4
    assert levels["L3"].figures["top1_agreement"] == 1.0 and levels["L3"].figures["kl_mean"] < 1e-6
    assert levels["L4"].figures == {
        "prompts": 3,
        "prompt_tokens": 8,
        "tokens_per_prompt": 12,
        "identical_prompts": 3,
        "rounding_ties": 0,
        "max_tie_gap": 0.0,
        "first_divergence": -1,
    }
    assert levels["L5"].figures["grad_rel_max"] < 1e-3 and levels["L5"].figures["parameters"] == 16

    m = metrics(v)
    json.dumps(m, allow_nan=False)  # valid JSON: NaN became null
    assert m["L3_logits"]["status"] == PASS and m["L3_logits"]["tolerance"]["top1_min"] == 0.999
    text = render(v)
    for heading in ("## Summary", "## Checkpoint checks", "## L1: kernels", "## L5: gradients"):
        assert heading in text


def noisy(std: float):
    def attention(q, k, v):
        out = torch_attention(q, k, v)
        return out + std * torch.randn_like(out)

    return Candidate("noisy attention", torch_layer_norm, attention)


def test_noise_in_attention_fails_l1_attention_and_the_model_levels(trained):
    levels = by_name(run_levels(trained, noisy(0.05)))
    l1 = levels["L1"]
    assert l1.status == FAIL and l1.reason.startswith("attention:")
    assert l1.figures["attention.failed"] == l1.figures["attention.cases"]
    assert l1.figures["layer_norm.failed"] == 0  # the kernel without noise passes its cases
    assert all(levels[n].status == FAIL for n in ("L2", "L3", "L5"))
    assert "block, same input layer 0" in levels["L2"].reason


def test_tiny_layer_norm_bias_shift_fails_only_where_the_tolerance_sees_it(trained):
    """A shift of 1e-3 is below bf16's tolerance (2e-2) but far above float32's (1e-5): the float32
    LayerNorm cases of L1 fail, its bf16 cases and all attention cases pass; the float32 model levels fail."""
    shifted = Candidate(
        "shifted layer_norm", lambda x, w, b, eps: torch_layer_norm(x, w, b, eps) + 1e-3, torch_attention
    )
    levels = by_name(run_levels(trained, shifted))
    l1 = levels["L1"]
    assert l1.status == FAIL and l1.reason.startswith("layer_norm:")
    failing = {(r["kernel"], r["dtype"]) for r in l1.rows if r["status"] != PASS}
    assert failing == {("layer_norm", "float32")}
    assert levels["L2"].status == FAIL and levels["L3"].status == FAIL


def test_kernel_that_raises_fails_its_cases_with_the_message(trained):
    def refuses(q, k, v, **dropout):
        raise TypeError("head dim 32 is not supported")

    levels = by_name(run_levels(trained, Candidate("refusing", torch_layer_norm, refuses)))
    assert levels["L1"].status == FAIL
    assert all(
        r["status"] == "fail: TypeError: head dim 32 is not supported"
        for r in levels["L1"].rows
        if r["kernel"] == "attention"
    )
    assert levels["L4"].status == FAIL and "head dim 32 is not supported" in levels["L4"].reason


def test_decode_divergence_reports_position_and_tokens(trained):
    """Attention that goes wrong only in contexts of 12 tokens and more: L4 names the first divergent token,
    and it is one generated after the context reached that length."""

    def late_bug(q, k, v):
        out = torch_attention(q, k, v)
        if q.size(-2) >= 12:
            out = out.clone()
            out[..., 11:, :] = -out[..., 11:, :]
        return out

    levels = by_name(run_levels(trained, Candidate("late bug", torch_layer_norm, late_bug)))
    l4 = levels["L4"]
    assert l4.status == FAIL and l4.figures["identical_prompts"] < 3
    diverged = [r for r in l4.rows if not r["identical"]]
    # prompts are 8 tokens: generated token s is chosen from a context of 8 + s tokens, so s >= 4
    assert all(r["first divergence"] >= 4 for r in diverged)
    assert l4.figures["first_divergence"] == min(r["first divergence"] for r in diverged)
    assert "streams differ at token" in l4.reason and "reference" in l4.reason and "candidate" in l4.reason
    assert diverged[0]["fp32 reference"].startswith("picks ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the cuTile levels can run")
def test_without_gpu_the_cutile_levels_are_skipped_with_the_reason(trained):
    _, weights, val, _ = trained
    v = verify(weights, val, VerifyParams(**FAST))  # the default candidate: the cuTile kernels
    levels = by_name(v)
    for name in ("L1", "L2", "L3", "L4", "L5"):
        assert levels[name].status == SKIPPED and "CUDA" in levels[name].reason, levels[name]
        assert not levels[name].figures  # nothing measured, nothing claimed
    assert v.status == "incomplete" and v.candidate == "cutile"
    assert metrics(v)["L4_decode"] == {
        "status": SKIPPED,
        "reason": levels["L4"].reason,
        "tolerance": {},
        "seconds": 0.0,
    }


def test_compile_gate_jobs_cover_the_model_signatures(trained):
    _, weights, _, _ = trained
    labels = [(j.kernel, j.label) for j in model_jobs(weights.config, "bfloat16", "float16", ["sm_90"])]
    signatures = [
        ("attention.fwd", "bfloat16 D=32"),
        ("attention.bwd_dq", "bfloat16 D=32"),
        ("attention.bwd_dkdv", "bfloat16 D=32"),
        ("attention.fwd", "float16 D=32"),
        ("layernorm.fwd", "float32 N=32 weight+bias"),
        ("layernorm.bwd", "float32 N=32 weight+bias"),
        ("layernorm.colsum", "float32 N=any weight+bias"),
        ("layernorm.fwd", "bfloat16 N=32 weight+bias"),
        ("layernorm.bwd", "bfloat16 N=32 weight+bias"),
        ("layernorm.colsum", "bfloat16 N=any weight+bias"),
    ]
    # the fused forward's kernels in the model's dtype: its width 32, MLP width 128, vocabulary 44
    signatures += [
        (f"residual_layernorm.{kind}", f"bfloat16 N=32 {variant}")
        for kind, variants in (("fwd", ("block", "embedding")), ("bwd", ("block", "embedding", "final")))
        for variant in variants
    ]
    signatures += [("bias_gelu.fwd", "bfloat16 F=128"), ("bias_gelu.bwd", "bfloat16 F=128")]
    unaligned = [("cross_entropy.fwd", "bfloat16 V=44"), ("cross_entropy.bwd", "bfloat16 V=44")]
    unaligned += [("column_sums", "float32 N=any")]  # its partials' shapes are not the model's
    # each also as the aligned signature that training-shaped tensors launch (sizes multiples of 16 here)
    expected = [(kernel, label + suffix) for kernel, label in signatures for suffix in ("", " 16B")]
    assert sorted(labels) == sorted(expected + unaligned)


def test_compile_gate_jobs_add_the_dropout_kernels_when_dropout_runs(trained):
    """Training with attention dropout, and L1's dropout cases, launch the attention kernels with dropout:
    the gate compiles those in the model's dtype, and the full gate knows them."""
    from gptcore.kernels.compile import jobs as all_jobs

    _, weights, _, _ = trained
    labels = [(j.kernel, j.label) for j in model_jobs(weights.config, "bfloat16", "float16", ["sm_90"], dropout=True)]
    for kernel in ("attention.fwd", "attention.bwd_dq", "attention.bwd_dkdv"):
        assert (kernel, "bfloat16 D=32 dropout") in labels and (kernel, "bfloat16 D=32 dropout 16B") in labels
    assert not [label for _, label in labels if label.startswith("float16") and "dropout" in label]
    known = {(j.kernel, j.label) for j in all_jobs(["sm_90"])}
    assert ("attention.bwd_dkdv", "bfloat16 D=64 dropout 16B") in known


def test_compile_gate_jobs_skip_the_aligned_signature_where_sizes_do_not_allow_it(trained):
    """A width that is not a multiple of 16 never launches the aligned LayerNorm signatures (plain or fused), nor a
    head dim or block size that is not one the aligned attention signature; the MLP's 4 x 36 = 144 columns are
    a multiple of 16, so only bias + GELU gets its aligned signature."""
    from dataclasses import replace

    _, weights, _, _ = trained
    odd = replace(weights.config, n_embd=36, n_head=2, block_size=30)  # head dim 18
    jobs = model_jobs(odd, "bfloat16", "float16", ["sm_90"])
    aligned = {(j.kernel, j.label) for j in jobs if j.aligned}
    assert jobs and aligned == {("bias_gelu.fwd", "bfloat16 F=144 16B"), ("bias_gelu.bwd", "bfloat16 F=144 16B")}


def test_compile_gate_jobs_add_the_long_sequence_forward_order(trained):
    """A model whose block size reaches the forward's long-sequence order (sm_90: T >= 2048) launches
    that variant too, so the gate compiles it; labels exist in gptcore.kernels.compile's full job list."""
    from dataclasses import replace

    from gptcore.kernels.compile import jobs as all_jobs

    _, weights, _, _ = trained
    long_config = replace(weights.config, block_size=2048)
    labels = [(j.kernel, j.label) for j in model_jobs(long_config, "bfloat16", "float16", ["sm_90"])]
    assert ("attention.fwd", "bfloat16 D=32 long") in labels and ("attention.fwd", "float16 D=32 long") in labels
    assert ("attention.fwd", "bfloat16 D=32 long") not in [
        (j.kernel, j.label) for j in model_jobs(weights.config, "bfloat16", "float16", ["sm_90"])
    ]
    known = {(j.kernel, j.label) for j in all_jobs(["sm_90"], full=True)}
    assert ("attention.fwd", "bfloat16 D=32 long") in known


@pytest.mark.slow
def test_verify_stage_on_any_checkpoint_writes_its_report_where_told(trained, tmp_path):
    """`stages/verify.py --checkpoint` on the train stage's ckpt.pt: the checks run, the compile gate
    compiles this model's kernels for sm_90 (cached after the first run), the cuTile levels are skipped on
    a CPU machine, and report and metrics land in --out, not in the pipeline's outputs."""
    root = trained[0]
    project = stage_project(root, tmp_path / "proj")
    out = tmp_path / "elsewhere"
    proc = run(
        [
            sys.executable,
            str(ROOT / "stages" / "verify.py"),
            "--checkpoint",
            str(root / "out" / "ckpt.pt"),
            "--out",
            str(out),
        ],
        project,
        env=stage_env(project),
        timeout=600,
    )
    m = json.loads((out / "verify.json").read_text())
    report = (out / "verify.md").read_text()
    assert m["compile_gate"]["status"] == PASS, m["compile_gate"]
    # attention fwd, dq, dkv (bf16) and fwd (fp16); LayerNorm fwd, bwd, column sums (fp32 and bf16); the
    # three attention kernels with dropout (bf16: L1's dropout cases); each with the plain and the aligned
    # ("16B") signature
    # attention, LayerNorm and the fused kernels, with dropout (L1 checks the kernels' dropout)
    expected = model_jobs(trained[1].config, "bfloat16", "float16", ["sm_90"], dropout=True)
    assert m["compile_gate"]["jobs"] == len(expected) == 53 and m["compile_gate"]["archs"] == "sm_90"
    assert m["source"].endswith("ckpt.pt") and "| vocab | pass |" in report
    if not torch.cuda.is_available():
        assert m["status"] == "incomplete" and m["skipped"] == 5 and proc.returncode == 0
        assert all(
            m[k]["status"] == SKIPPED and m[k]["reason"]
            for k in ("L1_kernels", "L2_blocks", "L3_logits", "L4_decode", "L5_grads")
        )
    assert not (project / "metrics").exists() and not (project / "reports").exists()

    # A failing check: the gate for an architecture that does not exist. Exit 1, report written first.
    proc = run(
        [
            sys.executable,
            str(ROOT / "stages" / "verify.py"),
            "--checkpoint",
            str(root / "cutile"),
            "--out",
            str(out),
            "--set",
            "compile_archs=[sm_1]",
        ],
        project,
        check=False,
        env=stage_env(project),
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    m = json.loads((out / "verify.json").read_text())
    assert m["status"] == FAIL and m["compile_gate"]["status"] == FAIL
    assert "sm_1" in m["compile_gate"]["reason"] and "**Status: FAIL**" in (out / "verify.md").read_text()
    assert not math.isnan(m["seconds"])


class ScriptedLM(torch.nn.Module):
    """A stand-in language model over 4 tokens whose next-token logits depend only on the context length:
    `script[t]` is the logit row after t tokens, with or without a KV cache (which only counts positions). Enough
    for L4's lockstep decoding and arbitration."""

    def __init__(self, script):
        super().__init__()
        self.config = type("Config", (), {"block_size": 64})()
        self.script = torch.tensor(script, dtype=torch.float32)

    def new_kv_cache(self, batch):
        return [type("Cache", (), {"length": 0})()]

    def forward(self, idx, kv_cache=None):
        length = idx.size(1) + (kv_cache[0].length if kv_cache else 0)
        if kv_cache:
            kv_cache[0].length = length
        rows = self.script[length - 1].expand(idx.size(0), idx.size(1), -1)
        return rows, None


@pytest.mark.parametrize("tie_gap, status", [(0.01, PASS), (0.0, FAIL)])
def test_decode_rounding_tie_is_reported_and_the_streams_resync(tie_gap, status):
    """The candidate prefers token 2 where the reference's logits of tokens 1 and 2 differ by 0.001 (a tie
    within 0.01): reported as a rounding tie, the candidate goes on from the reference's token, and the
    later steps still count; with tie_gap 0 the same stream fails."""
    from gptcore.verify import l4_decode

    ref_script = [[0, 5, 0, 0], [0, 1.0, 0.999, 0], [0, 0, 0, 5], [5, 0, 0, 0]]
    cand_script = [[0, 5, 0, 0], [0, 1.0, 1.001, 0], [0, 0, 0, 5], [5, 0, 0, 0]]
    prompts = torch.zeros(2, 1, dtype=torch.long)
    result = l4_decode.run(ScriptedLM(ref_script), ScriptedLM(cand_script), prompts, 3, torch.float32, tie_gap=tie_gap)
    assert result.status == status
    if status == PASS:
        assert result.figures["rounding_ties"] == 2 and result.figures["first_divergence"] == -1
        assert result.figures["max_tie_gap"] == pytest.approx(0.001, abs=1e-6)
        assert result.rows[0]["rounding ties"].startswith("1: 1 ") and not result.rows[0]["identical"]
    else:
        assert result.figures["first_divergence"] == 1 and "float32 logit gap 0.001 > tie gap 0" in result.reason


def test_decode_large_gap_is_a_divergence_even_with_a_tie_gap():
    from gptcore.verify import l4_decode

    ref_script = [[0, 5, 0, 0], [0, 3.0, 1.0, 0], [0, 0, 0, 5]]
    cand_script = [[0, 5, 0, 0], [0, 1.0, 3.0, 0], [0, 0, 0, 5]]
    result = l4_decode.run(
        ScriptedLM(ref_script),
        ScriptedLM(cand_script),
        torch.zeros(1, 1, dtype=torch.long),
        2,
        torch.float32,
        tie_gap=0.01,
    )
    assert result.status == FAIL and result.figures["first_divergence"] == 1
    assert result.rows[0]["fp32 reference"] == "picks 1, gap 2"
