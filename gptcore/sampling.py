"""Text generation: one sampler and one decoding loop, for the reference and the cuTile model.

`Decoder` runs the prompt once (prefill) and then each new token alone against the cached keys and
values of the tokens before it. The model has learned absolute positions (`wpe`), so the context cannot
grow past `block_size`: as in nanoGPT's generate, the context then becomes the last `block_size` tokens.
Every token of that window sits one position earlier than before, so the cached keys are stale; the cache
is rebuilt from the window, which is a full-block forward, exactly the computation nanoGPT does.
`Decoder(..., kv_cache=False)` runs the whole window through the model for every token instead (nanoGPT's
loop, the baseline the cache is measured against); both give the same tokens.

Sampling (`sample_tokens`) draws from the same generator exactly as nanoGPT's
`torch.multinomial(softmax(logits / temperature))` does, so with the same seed every path gives the same
tokens, at any length.

CUDA graphs: at batch 1 a small model spends its time launching ~100 small kernels per token, not
computing. A step at a given window position always has the same shapes (the cache lives in static,
preallocated buffers; the step reads and writes fixed slices of them), so the first time a position is
reached its step runs eagerly (which also compiles kernels and picks algorithms) and is then captured as
a CUDA graph; later generations replay it: one launch per token. The step includes the sampling and the
write of the new token into the window, so a replay needs nothing from the host. With `tokens_per_graph` N > 1
a graph holds the steps from one multiple of N to the next (so prompts of any length share them): one replay
per N tokens, and the host's time per token goes to ~0; a stream then shows its tokens N at a time. If capture
fails (for example a kernel launcher that the CUDA runtime refuses to record), decoding goes on eagerly and
`Decoder.graph_error` says why.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gptcore.checkpoint import gpt_from_checkpoint
from gptcore.cuda_graphs import capture, on_stream
from gptcore.cutile_model import model_class
from gptcore.errors import BackendUnavailable
from gptcore.kernels.runtime import attention_dtype_unsupported, cutile_unavailable
from gptcore.model import GPT

__all__ = [
    "BackendUnavailable",
    "Decoder",
    "decoding_mode",
    "resolve_backend",
    "filtered_probs",
    "generate_many",
    "load_for_inference",
    "sample_tokens",
    "stream_text",
]

Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per row


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, cuda_graph: bool) -> str:
    """The backend a sample param names; "auto" is the one that decodes faster here, as measured
    (results/h100/decode.csv): cutile where its kernels run (a CUDA GPU, a half dtype) and steps run eagerly,
    torch's KV cache replayed as CUDA graphs when graphs are on, and torch where cuTile cannot run."""
    if backend != "auto":
        return backend
    if cuda_graph or cutile_unavailable(device) or attention_dtype_unsupported(dtype):
        return "torch"
    return "cutile"


def decoding_mode(decoder: Decoder) -> str:
    """How `decoder` runs its steps, in words: CUDA graphs of N tokens, or eagerly (and why, when graphs failed)."""
    if decoder.use_graph:
        return f"CUDA graphs of {decoder.tokens_per_graph} tokens" if decoder.cache is not None else "CUDA graphs"
    return "eager" + (f" ({decoder.graph_error})" if decoder.graph_error and decoder.device.type == "cuda" else "")


def load_for_inference(checkpoint: dict, backend: str, device: torch.device, dtype: torch.dtype) -> GPT:
    """The checkpoint's model on `backend`, on `device`, weights cast to `dtype`, in eval mode.

    Cast rather than autocast: decoding runs a few small kernels per layer, and autocast would add a cast
    of every weight to every step. Dropout is set to 0 (eval mode ignores it; the cuTile attention would
    warn that it applies none)."""
    cls = model_class(backend)
    if backend == "cutile":
        reason = cutile_unavailable(device) or attention_dtype_unsupported(dtype)
        if reason:
            raise BackendUnavailable(f"backend 'cutile' cannot run: {reason}")
    ck = {**checkpoint, "model_args": {**checkpoint["model_args"], "dropout": 0.0}}
    return gpt_from_checkpoint(ck, cls).to(device=device, dtype=dtype).eval()


def filtered_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The sampling distribution of (B, V) logits at temperature > 0, after top-k and top-p filtering.
    Slices, not index lists, so nothing is copied from the host and a CUDA graph can capture it."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):  # a cut at k >= V keeps every logit
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[:, -1:], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs_sorted = torch.softmax(sorted_logits, dim=-1)
        drop = probs_sorted.cumsum(dim=-1) - probs_sorted > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.softmax(logits, dim=-1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: Generators = None,
) -> torch.Tensor:
    """One token per row from (B, V) logits: greedy at temperature 0, else top-k / top-p sampling. With a
    list of B generators, row i draws from generator i alone.

    The draws of `torch.multinomial(probs, 1)`, written so that a CUDA graph can capture it: ATen
    implements that as argmax(probs / E) with E ~ Exp(1) drawn from the generator (the "exponential race");
    writing it out consumes the generator identically and avoids multinomial's validity checks.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filtered_probs(logits, temperature, top_k, top_p)
    if isinstance(generator, (list, tuple)):  # one generator per row: each row draws what it would alone
        rows = [torch.empty_like(probs[i : i + 1]).exponential_(1, generator=g) for i, g in enumerate(generator)]
        race = torch.cat(rows)
    else:
        race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=True)


class Decoder:
    """Generation for one model and batch size: the one decoding loop, with or without the KV cache.

    State between steps: `window` holds the last `n` tokens of the context (n <= block_size), and the
    cache holds the keys/values of the first `cached` of them. A step runs window[:, cached:n] through
    the model (the whole prompt at first, then one token, or the whole window after it slid), samples
    the next token and appends it to the window, sliding the window by one when it is full. Without the
    cache (`kv_cache=False`) `cached` stays 0: every step runs the whole window.
    """

    def __init__(
        self,
        model: GPT,
        batch: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: Generators = None,
        cuda_graph: bool = False,
        kv_cache: bool = True,
        tokens_per_graph: int = 1,
    ):
        if not isinstance(tokens_per_graph, int) or tokens_per_graph < 1:
            raise ValueError(f"tokens_per_graph must be a positive integer, got {tokens_per_graph!r}")
        self.tokens_per_graph = tokens_per_graph
        self.model = model
        self.batch = batch
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"one generator per row: expected {batch}, got {len(generator)}")
        self.generator = generator
        self.block = model.config.block_size
        self.device = model.lm_head.weight.device
        self.cache = model.new_kv_cache(batch) if kv_cache else None
        self.window = torch.zeros(batch, self.block, dtype=torch.long, device=self.device)
        self.n = 0
        self.cached = 0
        self.graph_error: str | None = None
        self.use_graph = cuda_graph
        if cuda_graph and self.device.type != "cuda":
            self.use_graph = False
            self.graph_error = f"CUDA graphs need a CUDA device, the model is on {self.device}"
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}  # (start, n, steps): a graph
        self._pool = None
        self._stream = torch.cuda.Stream(self.device) if self.use_graph else None

    def generators(self) -> list[torch.Generator]:
        if self.generator is None:
            return []
        return list(self.generator) if isinstance(self.generator, (list, tuple)) else [self.generator]

    # ---- one step -------------------------------------------------------------------------------------
    def _step(self, start: int, n: int) -> None:
        """Run window[:, start:n] against a cache holding positions [0, start), sample the next token and
        append it to the window. Fixed shapes, no host synchronisation: capturable in a CUDA graph."""
        for layer in self.cache or ():
            layer.length = start  # python state only: the slices the forward reads and writes
        logits, _ = self.model(self.window[:, start:n], kv_cache=self.cache)
        nxt = sample_tokens(logits[:, -1, :], self.temperature, self.top_k, self.top_p, self.generator)
        if n < self.block:
            self.window[:, n : n + 1].copy_(nxt)
        else:  # the window is full: slide it by one, as the reference's crop does
            self.window.copy_(torch.cat((self.window[:, 1:], nxt), dim=1))

    def _steps(self, start: int, n: int, steps: int) -> None:
        """The step (start, n), then steps - 1 single-token steps after it (n + steps <= block_size: no slide)."""
        self._step(start, n)
        for i in range(1, steps):
            self._step(n + i - 1, n + i)

    def _capture(self, start: int, n: int, steps: int) -> None:
        """Record the steps as a CUDA graph. Capturing runs nothing, so no state changes."""
        # A generator the graph does not know about cannot be used inside it; registered, every replay
        # draws fresh numbers from it exactly as an eager step would.
        graph = capture(
            lambda: self._steps(start, n, steps), self._stream, pool=self._pool, generators=self.generators()
        )
        if self._pool is None:
            self._pool = graph.pool()  # every step shares one memory pool: they never run concurrently
        self.graphs[(start, n, steps)] = graph

    def _run(self, start: int, n: int, steps: int) -> None:
        graph = self.graphs.get((start, n, steps))
        if graph is not None:
            graph.replay()
            return
        if not self.use_graph:
            self._steps(start, n, steps)
            return
        # First time at these steps: run them eagerly on the capture stream (the warm-up capturing needs:
        # kernels compiled, cuBLAS / cuDNN / SDPA set up for that stream), then record them for next time.
        with on_stream(self._stream):
            self._steps(start, n, steps)
        try:
            self._capture(start, n, steps)
        except Exception as e:  # noqa: BLE001 - any failure to capture is reported, decoding goes on
            self.use_graph = False
            self.graph_error = f"CUDA graph capture failed at step ({start}, {n}): {type(e).__name__}: {e}"
            self.graphs.clear()

    def _chunk(self, remaining: int) -> int:
        """How many steps the next run takes: 1, or with the cache past the prompt, up to the next multiple of
        tokens_per_graph (so graphs are shared by every prompt length), within the block and the tokens asked."""
        if self.cache is None or self.cached == 0 or self.tokens_per_graph == 1 or self.n >= self.block:
            return 1
        to_boundary = self.tokens_per_graph - self.n % self.tokens_per_graph
        return max(1, min(to_boundary, remaining, self.block - self.n))

    # ---- generation -------------------------------------------------------------------------------------
    def stream(self, idx: torch.Tensor, max_new_tokens: int) -> Iterator[torch.Tensor]:
        """The tokens sampled after `idx` (batch, T), each (batch, 1) as soon as it exists (nothing is
        waited for but the GPU work of that token)."""
        if idx.dim() != 2 or idx.size(0) != self.batch:
            raise ValueError(f"expected token ids of shape ({self.batch}, T), got {tuple(idx.shape)}")
        if idx.size(1) == 0:
            raise ValueError("generation needs at least one prompt token")
        context = idx[:, -self.block :]
        self.n = context.size(1)
        self.cached = 0
        self.window[:, : self.n].copy_(context)
        produced = 0
        while produced < max_new_tokens:
            steps = self._chunk(max_new_tokens - produced)
            with torch.no_grad():  # around the steps only: the caller's code between tokens keeps its grad mode
                self._run(self.cached, self.n, steps)
            for _ in range(steps):
                if self.n < self.block:  # the token went to window[:, n]; everything before it is cached
                    self.cached = self.n if self.cache is not None else 0
                    self.n += 1
                else:  # the window slid: the cached keys are at the wrong positions now
                    self.cached = 0
                yield self.window[:, self.n - 1 : self.n].clone()
            produced += steps

    def generate(self, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """`idx` (batch, T) followed by `max_new_tokens` sampled tokens (nanoGPT's `generate`)."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens)], dim=1)


def stream_text(decoder: Decoder, tokenizer, ids: list[int], max_new_tokens: int) -> Iterator[str]:
    """Text as it is generated after the prompt `ids` (one row): each piece is what the new token adds. A
    byte-level BPE token can end inside a character; its bytes wait for the token that completes it."""
    prompt = torch.tensor([ids], dtype=torch.long, device=decoder.device)
    new: list[int] = []
    shown = ""
    for token in decoder.stream(prompt, max_new_tokens):
        new.append(int(token[0, 0]))
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: the next token completes it
            continue
        yield text[len(shown) :]
        shown = text


def generate_many(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cuda_graph: bool = False,
) -> list[list[int]]:
    """The `max_new_tokens` tokens after each prompt, in the prompts' order, generated in batches.

    The model's positions are absolute and a decode step runs every row of its batch at one position, so a
    batch holds prompts of one length (after the crop to block_size): the prompts are grouped by length and
    each group runs in batches of at most `batch_size` rows. Row i samples from its own generator seeded
    with seeds[i] (default: i), as `Decoder(model, 1, generator=<seeded seeds[i]>)` would alone, so its
    tokens do not depend on which prompts share its batch. One Decoder per batch size serves every batch of
    that size (its CUDA graphs are keyed by position, not by prompt)."""
    if not prompts:
        raise ValueError("generate_many needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    block = model.config.block_size
    device = model.lm_head.weight.device
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        by_length.setdefault(min(len(prompt), block), []).append(i)
    decoders: dict[int, Decoder] = {}
    out: list[list[int]] = [[] for _ in prompts]
    for rows in by_length.values():
        for first in range(0, len(rows), batch_size):
            batch = rows[first : first + batch_size]
            if len(batch) not in decoders:
                generators = [torch.Generator(device=device) for _ in batch]
                decoders[len(batch)] = Decoder(
                    model, len(batch), temperature, top_k, top_p, generators, cuda_graph=cuda_graph
                )
            decoder = decoders[len(batch)]
            for row, generator in zip(batch, decoder.generator, strict=True):
                generator.manual_seed(seeds[row])
            idx = torch.tensor([list(prompts[row][-block:]) for row in batch], dtype=torch.long, device=device)
            new = decoder.generate(idx, max_new_tokens)[:, idx.size(1) :].tolist()
            for row, tokens in zip(batch, new, strict=True):
                out[row] = tokens
    return out
