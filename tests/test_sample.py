"""Generation: the KV-cache decoder gives the reference's tokens (within and beyond the block, sampled and
greedy), and the sample stage writes the samples, its metrics and clear errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_gpt
from pipeline_helpers import SPEECHES, env_for, make_project, run

from gptcore import tokenizer as tok
from gptcore.files import atomic_write_bytes
from gptcore.model import GPT, GPTConfig
from gptcore.sampling import Decoder, filtered_probs, generate_many, sample_tokens
from gptcore.tokenizer import CharTokenizer

BLOCK = 16


def tiny_model(dtype=torch.float32) -> GPT:
    model = tiny_gpt(block_size=BLOCK, vocab_size=50, n_layer=2, n_head=4, n_embd=64).eval()
    with torch.no_grad():
        # A random model's next-token distribution is almost flat; sharper logits make the test about
        # the decoding, not about which of two near-equal logits rounding happens to favour.
        model.transformer.wte.weight.mul_(10)
    return model.to(dtype)


def nanogpt_generate(model, idx, max_new_tokens, temperature, top_k, generator):
    """karpathy/nanoGPT's `generate`, written out: the reference the one decoding loop must reproduce."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])
        logits = logits[:, -1, :]
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def uncached(model, prompt, new, temperature, top_k, top_p, generator):
    return Decoder(model, prompt.size(0), temperature, top_k, top_p, generator, kv_cache=False).generate(prompt, new)


SETTINGS = [  # temperature, top_k, top_p
    pytest.param(0.0, None, None, id="greedy"),
    pytest.param(0.8, 200, None, id="top_k"),
    pytest.param(1.0, 10, 0.9, id="top_k+top_p"),
]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
@pytest.mark.parametrize("prompt_len", [3, BLOCK + 4])  # shorter and longer than the block
def test_cached_decoding_gives_the_uncached_tokens(temperature, top_k, top_p, prompt_len):
    model = tiny_model()
    prompt = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    new = 2 * BLOCK + 3  # well past the block: the window slides and the cache is rebuilt every step
    full = uncached(model, prompt, new, temperature, top_k, top_p, torch.Generator().manual_seed(7))
    decoder = Decoder(model, 2, temperature, top_k, top_p, torch.Generator().manual_seed(7))
    cached = decoder.generate(prompt, new)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached, full)
    # and the same decoder again, same seed: the static buffers carry nothing over between generations
    decoder.generator.manual_seed(7)
    assert torch.equal(decoder.generate(prompt, new), full)
    if top_p is None:  # the reference's own loop (nanoGPT's generate, which has no top_p)
        reference = nanogpt_generate(model, prompt, new, temperature, top_k, torch.Generator().manual_seed(7))
        assert torch.equal(cached, reference)


def test_cached_decoding_within_the_block_in_float64():
    model = tiny_model(torch.float64)
    prompt = torch.tensor([[3, 1, 4]])
    new = BLOCK - 3  # exactly fills the block: no sliding at all
    full = uncached(model, prompt, new, 0.8, 200, None, torch.Generator().manual_seed(1))
    cached = Decoder(model, 1, 0.8, 200, None, torch.Generator().manual_seed(1)).generate(prompt, new)
    assert torch.equal(cached, full)


def test_decoder_runs_one_token_per_step_then_rebuilds_the_window():
    model = tiny_model()
    lengths = []  # (tokens fed, cache length before the step) for every forward
    original = model.forward

    def spy(idx, targets=None, kv_cache=None):
        lengths.append((idx.size(1), kv_cache[0].length))
        return original(idx, targets, kv_cache)

    model.forward = spy
    Decoder(model, 1, 0.0).generate(torch.zeros(1, 4, dtype=torch.long), BLOCK + 2)
    # 18 new tokens: the prefill of the 4-token prompt gives the 1st; one token per step against the cache
    # gives the next 12 (positions 4..15, until the block is full); then the window has slid and each of
    # the last 5 is a full-block rebuild from position 0, as the reference's crop computes it
    expected = [(4, 0)] + [(1, n) for n in range(4, BLOCK)] + [(BLOCK, 0)] * 5
    assert lengths == expected


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_batched_generation_gives_each_prompt_its_tokens_alone(temperature, top_k, top_p):
    """Prompts of different lengths (one longer than the block) in batches of up to 2, decoding past the
    block: each row's tokens are those of generating its prompt alone from its seed (float64, so that
    batching cannot change a rounding)."""
    model = tiny_model(torch.float64)
    g = torch.Generator().manual_seed(5)
    lengths = [3, 5, 5, 1, BLOCK + 8, 5, 3]
    prompts = [torch.randint(50, (n,), generator=g).tolist() for n in lengths]
    seeds = [11, 12, 13, 14, 15, 16, 17]
    batched = generate_many(model, prompts, BLOCK + 4, seeds, 2, temperature, top_k, top_p)
    for prompt, seed, tokens in zip(prompts, seeds, batched, strict=True):
        alone = Decoder(model, 1, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
        assert tokens == alone.generate(torch.tensor([prompt]), BLOCK + 4)[0, len(prompt) :].tolist()
    if temperature > 0:  # the seeds matter: from other seeds, a model that is not sharpened samples otherwise
        flat = GPT(model.config).double().eval()
        assert generate_many(flat, prompts, 8, seeds, 2, temperature, top_k, top_p) != generate_many(
            flat, prompts, 8, [s + 100 for s in seeds], 2, temperature, top_k, top_p
        )


def test_batched_generation_checks_its_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs at least one prompt"):
        generate_many(model, [], 4)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_many(model, [[1], []], 4)
    with pytest.raises(ValueError, match="one seed per prompt: 2 prompts, 1 seeds"):
        generate_many(model, [[1], [2]], 4, seeds=[0])
    with pytest.raises(ValueError, match="one generator per row: expected 2, got 1"):
        Decoder(model, 2, 1.0, generator=[torch.Generator()])


def test_sample_tokens_draws_like_multinomial():
    """The one sampler draws exactly what torch.multinomial (nanoGPT's draw) gives with the same generator."""
    logits = torch.randn(4, 65, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(0.0, None, None), (1.0, None, None), (0.8, 200, None), (0.7, 5, 0.8)]:
        for seed in range(5):
            ours = sample_tokens(logits, temperature, top_k, top_p, torch.Generator().manual_seed(seed))
            if temperature == 0:
                ref = logits.argmax(dim=-1, keepdim=True)
            else:
                ref = torch.multinomial(
                    filtered_probs(logits, temperature, top_k, top_p), 1, generator=torch.Generator().manual_seed(seed)
                )
            assert torch.equal(ours, ref), (temperature, top_k, top_p, seed)


def test_generate_greedy_and_sampling():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=4, n_embd=64)).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    out = Decoder(m, 1, temperature=0).generate(idx, 40)  # longer than block_size: the context window slides
    assert out.shape == (1, 41)
    assert torch.equal(out, Decoder(m, 1, temperature=0).generate(idx, 40))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(
        Decoder(m, 1, 0.8, 5, generator=g1).generate(idx, 10), Decoder(m, 1, 0.8, 5, generator=g2).generate(idx, 10)
    )
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    for _ in range(20):
        assert sample_tokens(logits, 1.0, top_k=1).item() == 2
        assert sample_tokens(logits, 1.0, top_p=0.5).item() == 2


def test_cuda_graph_request_on_cpu_is_reported_not_faked():
    decoder = Decoder(tiny_model(), 1, 0.0, cuda_graph=True)
    assert not decoder.use_graph and "CUDA" in decoder.graph_error
    out = decoder.generate(torch.zeros(1, 1, dtype=torch.long), 5)
    assert out.shape == (1, 6) and not decoder.graphs


# ---- the stage ---------------------------------------------------------------------------------------------


def write_model(project, vocab: CharTokenizer) -> None:
    """A tiny untrained checkpoint over the corpus vocabulary (the stage does not care how good it is)."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=BLOCK, vocab_size=vocab.vocab_size, n_layer=1, n_head=2, n_embd=32)
    (project / "out").mkdir(exist_ok=True)
    torch.save({"model_args": config.to_dict(), "model": GPT(config).state_dict()}, project / "out" / "ckpt.pt")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = make_project(
        tmp_path_factory.mktemp("sample"), sample={"num_samples": 3, "max_new_tokens": 40, "prompt": "MENENIUS:\n"}
    )
    vocab = CharTokenizer.from_text(SPEECHES)
    (proj / "data").mkdir(exist_ok=True)
    tok.save(vocab, proj / "data", atomic_write_bytes)
    write_model(proj, vocab)
    return proj


@pytest.mark.slow
def test_sample_stage_writes_the_samples_and_metrics(project):
    out = run([sys.executable, "stages/sample.py"], project)  # MLflow on, as under dvc repro
    text = (project / "samples" / "samples.txt").read_text()
    headers = [f"==> sample {i} of 3 <==" for i in (1, 2, 3)]
    assert [line for line in text.splitlines() if line.startswith("==> sample ")] == headers
    starts = [text.index(h + "\n") for h in headers] + [len(text) + 1]
    for i, h in enumerate(headers):  # each sample: the prompt, then exactly max_new_tokens characters
        body = text[starts[i] + len(h) + 1 : starts[i + 1] - 1].removesuffix("\n")
        assert body.startswith("MENENIUS:\n") and len(body) == len("MENENIUS:\n") + 40, repr(body)
    m = json.loads((project / "metrics" / "sample.json").read_text())
    assert m["tokens_generated"] == 120 and m["tokens_per_sec"] > 0 and m["cuda_graph_steps"] == 0
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (latest,) = client.search_runs(
        [client.get_experiment_by_name("gptcore").experiment_id], "tags.`dvc.stage` = 'sample'", max_results=1
    )
    assert latest.data.tags["sample.backend"] == "torch" and latest.data.tags["sample.device"] == "cpu"
    assert latest.data.params["sample.num_samples"] == "3" and latest.info.status == "FINISHED"
    assert "==> sample 3 of 3 <==" in out.stdout


@pytest.mark.slow
def test_sample_stage_is_reproducible_and_takes_command_line_overrides(project):
    env = {**env_for(project), "GPTCORE_MLFLOW": "off"}  # as on the GPU machine, which has no MLflow
    args = [sys.executable, "stages/sample.py", "--num-samples", "2", "--max-new-tokens", "25", "--top-p", "0.9"]
    first = run(args + ["--out", "a.txt"], project, env=env)
    run(args + ["--out", "b.txt"], project, env=env)
    a, b = (project / "a.txt").read_text(), (project / "b.txt").read_text()
    assert a == b  # same seed, same text
    assert a.count("==> sample ") == 2 and "==> sample 2 of 2 <==" in a
    assert "MLflow logging is off" in first.stdout
    m = json.loads((project / "a.txt.metrics.json").read_text())  # a run by hand's metrics, beside its --out
    assert m["tokens_generated"] == 50
    record = json.loads(max((project / "mlflow-offline").glob("sample-*.json")).read_text())
    logged = record["params"]
    assert (logged["sample.num_samples"], logged["sample.max_new_tokens"], logged["sample.top_p"]) == (2, 25, 0.9)


@pytest.mark.slow
def test_sample_stage_streams_in_a_terminal_the_text_it_writes(project):
    """In a terminal (a pseudo-terminal here) the stage prints each sample as it is generated: what the
    terminal shows is what samples.txt holds, from the same seed."""
    env = {**env_for(project), "GPTCORE_MLFLOW": "off"}
    args = ["--num-samples", "2", "--max-new-tokens", "30"]
    run([sys.executable, "stages/sample.py", *args, "--out", "piped.txt"], project, env=env)
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "stages/sample.py", *args, "--out", "tty.txt"],
        cwd=project,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    shown = b""
    while chunk := read_or_eof(leader):
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    written = (project / "tty.txt").read_text()
    assert written == (project / "piped.txt").read_text()  # streaming changes nothing but when text shows
    terminal = shown.decode().replace("\r\n", "\n")
    assert written.replace("\n\n==> ", "\n==> ") in terminal  # the samples, each as it was generated


def read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # Linux reports the closed terminal as EIO
        return b""


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "MENENIUS: ¿é?"], "characters not in the vocabulary: '¿', 'é' (2 distinct"),
        (["--backend", "cutile"], "backend 'cutile' cannot run"),
        (["--top-k", "0"], "sample.top_k: must be at least 1 (off or null: no top-k cut), got 0"),
        (["--checkpoint", "out/missing.pt"], "checkpoint not found"),
    ],
)
def test_sample_stage_errors_are_clear(project, args, message):
    out = run(
        [sys.executable, "stages/sample.py", *args],
        project,
        check=False,
        env={**env_for(project), "GPTCORE_MLFLOW": "off"},
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
