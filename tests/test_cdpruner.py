"""CDPruner keeps, per image, the greedy MAP picks of the conditional DPP whose kernel is relevance x cosine
similarity x relevance, the relevance being the negated mean cosine of each visual token to the prompt's text
embeddings, min-max normalised per image; ``kernels.dpp_greedy`` makes the picks of a naive determinant greedy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune import kernels

from .conftest import FACTORIES, Prompt


def _naive_dpp(kernel: torch.Tensor, count: int) -> list[int]:
    """Greedy MAP written from the definition: each step recomputes the log-determinant of every candidate's
    submatrix (float64) and adds the first candidate with the largest one."""
    kernel = kernel.double()
    picks: list[int] = []
    for _ in range(count):
        best, best_value = -1, float("-inf")
        for i in range(kernel.shape[0]):
            if i in picks:
                continue
            index = torch.tensor([*picks, i])
            sign, logdet = torch.linalg.slogdet(kernel[index][:, index])
            value = float(logdet) if sign > 0 else float("-inf")
            if value > best_value:
                best, best_value = i, value
        picks.append(best)
    return picks


def _random_kernel(batch: int, n: int, dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(batch, n, dim, generator=gen), dim=-1)
    relevance = torch.rand(batch, n, generator=gen) + 0.05
    return relevance.unsqueeze(2) * (x @ x.transpose(1, 2)) * relevance.unsqueeze(1)


def test_dpp_greedy_makes_the_naive_determinant_picks():
    kernel = _random_kernel(3, 12, 20, seed=0)
    picks = kernels.dpp_greedy(kernel, 12)
    assert picks.shape == (3, 12) and picks.dtype == torch.long
    assert [row.tolist() for row in picks] == [_naive_dpp(kernel[b], 12) for b in range(3)]
    assert torch.equal(kernels.dpp_greedy(kernel, 5), picks[:, :5])


def test_dpp_greedy_on_a_rank_deficient_kernel_fills_the_rest_by_index():
    kernel = _random_kernel(2, 9, 3, seed=1)  # rank 3
    picks = kernels.dpp_greedy(kernel, 9)
    for b in range(2):
        row = picks[b].tolist()
        assert row[:3] == _naive_dpp(kernel[b], 3)
        assert row[3:] == sorted(set(range(9)) - set(row[:3]))


def test_dpp_greedy_rejects_bad_inputs():
    kernel = _random_kernel(1, 5, 4, seed=2)
    with pytest.raises(ValueError, match="must be \\(B, n, n\\)"):
        kernels.dpp_greedy(kernel[:, :4], 2)
    with pytest.raises(ValueError, match="float32"):
        kernels.dpp_greedy(kernel.double(), 2)
    for count in (0, 6, 2.0):
        with pytest.raises(ValueError, match="count="):
            kernels.dpp_greedy(kernel, count)


def _official_rule(features: torch.Tensor, text: torch.Tensor, count: int, theta: float | None) -> list[int]:
    """The selection as the official code states it, on one image: (n, D) features, (T, D) text embeddings."""
    x = F.normalize(features.double(), dim=-1)
    t = F.normalize(text.double(), dim=-1)
    relevance = (-(x @ t.T)).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    kernel = relevance[:, None] * (x @ x.T) * relevance[None, :]
    return sorted(_naive_dpp(kernel, count))


@pytest.mark.parametrize("theta", [None, 0.5])
def test_cdpruner_keeps_the_conditional_dpp_picks_of_the_llm_input(theta):
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=5)], seed=3)
    seen = []
    hook = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True,
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    hidden = seen[0]  # (B, L, D): the unpruned LLM input, every visual feature scattered in
    with torch.no_grad():
        vtprune.wrap(model, "cdpruner", keep=0.25, theta=theta)
        model(**inputs)
    assert model.vtprune.pruner.config.positions == "renumber"
    text = (inputs["input_ids"] != model.config.image_token_id) & inputs["attention_mask"].bool()
    stats = model.vtprune.last_stats
    positions = factory.image_positions(model, inputs)
    checked = 0
    for b, sample in enumerate(stats["samples"]):
        for image_positions, kept in zip(positions[b], sample["stages"][0]["kept"], strict=True):
            expected = _official_rule(hidden[b, image_positions], hidden[b, text[b]], len(kept), theta)
            assert sorted(kept) == expected
            checked += 1
    assert checked == 3


def test_cdpruner_positions_follow_the_official_code_per_family():
    model = FACTORIES["llava"].build("sdpa")
    vtprune.wrap(model, "cdpruner", keep=0.5, where="llm:2")
    assert model.vtprune.pruner.config.positions == "original"  # nothing dropped before the LLM to renumber
    qwen = FACTORIES["qwen2_vl"].build("sdpa")
    vtprune.wrap(qwen, "cdpruner", keep=0.5)
    assert qwen.vtprune.pruner.config.positions == "original"


@pytest.mark.parametrize("where", ["encoder", "projector", "decode:2"])
def test_cdpruner_refuses_points_without_text(where):
    with pytest.raises(ValueError, match="where='llm:0'"):
        vtprune.wrap(FACTORIES["llava"].build("sdpa"), "cdpruner", keep=0.5, where=where)


@pytest.mark.parametrize("theta", [1.0, -0.1, True, "0.5"])
def test_cdpruner_rejects_bad_theta(theta):
    with pytest.raises(ValueError, match="theta="):
        vtprune.wrap(FACTORIES["llava"].build("sdpa"), "cdpruner", keep=0.5, theta=theta)
