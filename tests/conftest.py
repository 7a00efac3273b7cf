"""Tiny random-weight model factories, one per family; the registry-driven test matrix runs on each of them.

Adding a family = one adapter file + one factory here (a class with ``build(attn)`` and ``prompt(...)``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vtprune.eval.tiny import tiny_llava


@dataclasses.dataclass
class Prompt:
    """One sample: how many images, how much text around them."""

    images: int = 1
    prefix: int = 3
    suffix: int = 4


class LlavaFactory:
    model_type = "llava"

    def build(self, attn: str = "eager"):
        return tiny_llava("test", seed=0, attn_implementation=attn)

    def tokens_per_image(self, model) -> int:
        vision = model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def inputs(self, model, prompts: list[Prompt], seed: int = 0) -> dict[str, torch.Tensor]:
        """Left-padded batch with random text ids and random pixels, one pixel tensor per image in prompt order."""
        gen = torch.Generator().manual_seed(seed)
        image_id = model.config.image_token_id
        n = self.tokens_per_image(model)
        vocab = model.config.text_config.vocab_size
        rows, pixels = [], []
        for prompt in prompts:
            ids = [1] + torch.randint(8, vocab, (prompt.prefix,), generator=gen).tolist()
            for _ in range(prompt.images):
                ids += [image_id] * n + torch.randint(8, vocab, (2,), generator=gen).tolist()
                size = model.config.vision_config.image_size
                pixels.append(torch.randn(3, size, size, generator=gen))
            ids += torch.randint(8, vocab, (prompt.suffix,), generator=gen).tolist()
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, ids in enumerate(rows):
            input_ids[b, width - len(ids):] = torch.tensor(ids)
            mask[b, width - len(ids):] = 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
        return out


FACTORIES = {"llava": LlavaFactory()}


@pytest.fixture(params=sorted(FACTORIES))
def factory(request):
    return FACTORIES[request.param]
