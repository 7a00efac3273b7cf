"""The adapter's attention probe (``ctx.attention_rows``) equals the eager attention weights of layer K-1, on every
family, with and without a KV cache; so attention-guided pruners see exactly what ``output_attentions`` would give."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import FACTORIES, Prompt

from vtprune.config import PrunerConfig
from vtprune.engine import Engine
from vtprune.point import PATTERNS, Point
from vtprune.pruners.base import Pruner
from vtprune.state import PruneContext, Selection, Stage


@dataclasses.dataclass(frozen=True)
class _ProbeConfig(PrunerConfig):
    method = "probe-recorder"


class _ProbeRecorder(Pruner):
    """Keeps everything at layer K and records the probe's rows for the last and first text queries."""

    config_cls = _ProbeConfig
    points = PATTERNS

    def __init__(self, layer: int) -> None:
        super().__init__(_ProbeConfig(keep=0.5))
        self.layer = layer
        self.rows = None
        self.queries = None

    def plan(self, num_layers: int) -> list[Stage]:
        # Adaptive with no cap: the engine calls select although it keeps everything.
        return [Stage(Point("llm", self.layer), 1.0, adaptive=True)]

    def select(self, ctx: PruneContext) -> Selection:
        last = ctx.attention_mask.shape[1] - 1
        self.queries = torch.stack([torch.stack((t[0], torch.tensor(last))) for t in ctx.text_positions])
        self.rows = ctx.attention_rows(self.queries)
        return Selection(keep=[torch.arange(im.num_tokens) for im in ctx.images])


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("family", sorted(FACTORIES))
def test_probe_equals_eager_attention(family, use_cache):
    factory = FACTORIES[family]
    model = factory.build("eager")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=1, prefix=5)], seed=4)
    layer = 2
    with torch.no_grad():
        expected = model(**inputs, output_attentions=True, use_cache=use_cache).attentions[layer - 1]
        adapter = Engine(model)
        recorder = _ProbeRecorder(layer)
        adapter.install(recorder)
        model(**inputs, use_cache=use_cache)
        adapter.remove()
    for b in range(expected.shape[0]):
        want = expected[b].mean(0)[recorder.queries[b]].float()
        torch.testing.assert_close(recorder.rows[b], want, atol=1e-5, rtol=0)
