"""FastV keeps, per image, the visual tokens with the largest head-mean attention from the prompt's last token in
layer K-1, exactly as the eager attention weights (output_attentions) of the unpruned model rank them."""

from __future__ import annotations

import pytest
import torch

import vtprune

from .conftest import FACTORIES, Prompt


@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_fastv_keeps_the_top_last_token_attention_of_layer_k_minus_1(family):
    factory = FACTORIES[family]
    model = factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5)], seed=2)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
        vtprune.wrap(model, "fastv", keep=0.25)
        model(**inputs)
    scores = attentions[1].mean(1)[:, -1]  # layer K-1 = 1, heads averaged, the last query row: (B, L)
    stats = model.vtprune.last_stats
    for b, (sample, positions) in enumerate(zip(stats["samples"], factory.image_positions(model, inputs),
                                                strict=True)):
        for image_positions, kept in zip(positions, sample["stages"][0]["kept"], strict=True):
            expected = scores[b, image_positions].topk(len(kept)).indices
            assert sorted(kept) == sorted(expected.tolist())


def test_fastv_refuses_a_point_without_a_previous_layer():
    model = FACTORIES["llava"].build("sdpa")
    for where in ("llm:0", "projector"):
        with pytest.raises(ValueError, match="llm:K' with K >= 1"):
            vtprune.wrap(model, "fastv", keep=0.5, where=where)
