"""Small Hugging Face transformers (random weights, no download) for the head-group tests:
ViT on 16x16 images, BERT and Llama (grouped-query attention, 4 query heads over 2 key/value
heads) on 12 token ids, each wrapped by ``examples.hf_tasks.Logits`` to return its logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from examples.hf_tasks import hf_model  # noqa: E402

TOKENS = 12


def example_input(arch: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if arch == "vit":
        return torch.randn(1, 3, 16, 16, generator=gen)
    return torch.randint(1, 64, (1, TOKENS), generator=gen)  # id 0 is Llama's padding


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return hf_model(arch, num_labels=3, image_size=16)
