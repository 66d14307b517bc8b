"""Generation on the GPU: batched generation with a generator per row, eager and replayed as CUDA graphs."""

from __future__ import annotations

import pytest
import torch

from gptcore.model import GPT, GPTConfig
from gptcore.sampling import Decoder, generate_many, load_for_inference

pytestmark = pytest.mark.gpu
BLOCK = 16


@pytest.mark.parametrize("backend", ["torch", "cutile"])
def test_batched_generation_replays_graphs_with_a_generator_per_row(backend):
    """On the GPU, each decode step of a batch captured as a CUDA graph that draws from every row's own
    generator: the replays sample what the eager steps sample, and what each prompt samples alone."""
    device = torch.device("cuda")
    config = GPTConfig(block_size=BLOCK, vocab_size=50, n_layer=2, n_head=4, n_embd=64)
    torch.manual_seed(0)
    model = load_for_inference(
        {"model_args": config.to_dict(), "model": GPT(config).state_dict()}, backend, device, torch.bfloat16
    )
    prompts = [[1, 2, 3], [4, 5, 6], [7], [8, 9, 10], [11, 12, 13]]
    args = (model, prompts, BLOCK + 4, [3, 1, 4, 1, 5], 2, 1.0, 20, None)
    eager = generate_many(*args, cuda_graph=False)
    # rows 0 and 1 capture a graph per step; rows 3 and 4 (the same length) replay them
    assert generate_many(*args, cuda_graph=True) == eager
    if backend == "torch":  # float32: a batch's matmuls round too little differently from a row's to move a draw
        model = model.float()
        batched = generate_many(model, prompts, BLOCK + 4, [3, 1, 4, 1, 5], 2, 1.0, 20, None, cuda_graph=True)
        alone = Decoder(model, 1, 1.0, 20, None, torch.Generator(device).manual_seed(3), cuda_graph=True)
        assert alone.generate(torch.tensor([prompts[0]], device=device), BLOCK + 4)[0, 3:].tolist() == batched[0]
