"""PyramidDrop: drop a share λ of the visual tokens at the end of each of a few LLM stages (Xing et al., CVPR 2025).

Paper: "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction", arXiv
2410.17247; official code github.com/Cooperx521/PyramidDrop (``llava/model/modeling_llama_pdrop.py``:
``LlamaModel.pdrop_forward`` and ``pdrop_rank_drop``; the eval scripts ``scripts/v1_5/pdrop_eval/*.sh``; read for
this re-implementation, no code was copied).

The LLM is cut into stages at ``layers`` (the code's ``--layer_list '[8,16,24]'`` of Vicuna's 32 layers). At the input
of each stage's first layer every image's present visual tokens are ranked by the attention the prompt's last
instruction token pays them, averaged over heads, and the top λ of them are kept (``--image_token_ratio_list
"[0.5,0.25,0.125]"``, λ = 0.5): the visual tokens entering the layers are n, λn, λ²n, λ³n — a pyramid.

Schedule (``plan``), all counts relative to the image's original n tokens:
- ``layers`` None: 8 / 16 / 24 scaled to the model's depth L as round(l·L/32), each clamped to 1..L−1, duplicates
  removed (1, 2, 3 for L = 4; 3, 6, 9 for L = 12; 8, 16, 24 for L = 32).
- ``budget="input"`` (as adsc.py): ``keep`` is the share right after the first drop, the visual tokens entering layer
  l₁; the stages keep keep, keep·λ, keep·λ², ... with λ = ``ratio``, the code's 0.5 when ``ratio`` is None, so
  that keep=0.5 is the code's 0.5 / 0.25 / 0.125.
- ``budget="average"``: λ is solved (bisection, the mean is increasing in λ) so that the mean over the L layers of
  the visual share is ``keep``: K̄/n = (l₁ + Σ_m λ^m (l_{m+1} − l_m)) / L with l_{M+1} = L (METHODS.md §0.2). The
  layers before l₁ see every token, so keep must exceed l₁ / L (a clear error otherwise). λ = 0.5 on 8 / 16 / 24 of
  32 averages 15 / 32 ≈ 0.47 (270 of 576).

Faithful to the official code: the 8 / 16 / 24 stages and the geometric λ schedule, the last instruction token's
(the prompt's last token's) attention row as the only score, softmax over the whole current sequence and then
the head mean restricted to the image's tokens, top-k of the tokens still present, survivors kept in order, text
never dropped, drops in prefill only (decoding keeps the pruned caches).

Differs:
- Layer of the score: ``pdrop_rank_drop`` recomputes the attention of layer l (the stage's first layer: its
  input_layernorm, q_proj and k_proj applied to the output of layer l−1) before layer l runs. Here the row comes
  from vtprune's probe, the attention of layer l−1 (the last layer of the finished stage, as FastV), so the scores
  are one layer earlier than the code's. The probe works with sdpa and FlashAttention, as the code's own
  recomputation does.
- Positions: the code renumbers the survivors' position ids contiguously after every drop (and shifts them at
  decoding); vtprune keeps each token's original position, the convention of its in-LLM methods.
- Counts: the code keeps int(n·ratio) (floor); vtprune rounds (``vtprune.budget.kept_count``). The code's single
  top-k per sample covers its one image (LLaVA-NeXT's row newlines included); here each image (video, InternVL tile
  group) has its own top-k and budget, and layout tokens are never dropped. Ties go to the earlier token (stable
  argsort) where the code's ``topk`` is unspecified; the scores stay fp32 where the code casts the softmax back to
  the model's dtype before the head mean.
- The λ solving for ``budget="average"`` is ours: the code sets the per-stage ratios by hand.
- Training with PyramidDrop active (the paper's other use; the code's last-instruction rows of every answer) is not
  implemented: this is the paper's training-free inference mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtprune.budget import solve_ratio
from vtprune.config import PrunerConfig, layer_tuple, scaled_layers
from vtprune.point import Point
from vtprune.pruners.base import Pruner
from vtprune.pruners.fastv import top_last_token_attention
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection, Stage

PAPER_LAYERS = (8, 16, 24)  # of a 32-layer LLM: the eval scripts' --layer_list '[8,16,24]'
PAPER_DEPTH = 32
OFFICIAL_RATIO = 0.5  # λ: each stage keeps half of what is left (--image_token_ratio_list "[0.5,0.25,0.125]")


@dataclass(frozen=True)
class PDropConfig(PrunerConfig):
    """Attributes:
    layers: decoder layers at whose input each stage drops, strictly increasing, each >= 1 (the score is the
        attention of the layer before) and < L. None = the code's 8 / 16 / 24 of 32 scaled to the model's depth L
        (round(l·L/32), clamped to 1..L-1, duplicates removed).
    ratio: λ, the fraction of the present tokens each stage after the first keeps, under ``budget="input"``. None
        (the default) = 0.5, the code's λ (keep=0.5: its 0.5 / 0.25 / 0.125; keep=0.11: 0.11 / 0.055 / 0.0275). Under
        ``budget="average"`` λ is solved from ``keep``; leave it None.
    """

    method = "pdrop"
    layers: tuple[int, ...] | None = None
    ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", layer_tuple(
            self.layers, 1, "pdrop ranks the tokens by the attention of the layer before each stage", "(8, 16, 24)"))
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio must be a number in (0, 1] or None, got {type(self.ratio).__name__}.")
            if not 0.0 < self.ratio <= 1.0:
                raise ValueError(
                    f"ratio={self.ratio} is outside (0, 1]: it is λ, the fraction of the present tokens each stage "
                    "keeps (the paper's 0.5)."
                )
            if self.budget == "average":
                raise ValueError(
                    "ratio is solved from keep under budget='average'; leave ratio=None, or use budget='input' to "
                    "set the first stage's keep and λ of the later stages yourself."
                )


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The code's 8 / 16 / 24-of-32 stages scaled to ``num_layers`` decoder layers, each in 1..L-1."""
    if num_layers < 2:
        raise ValueError(
            f"pdrop needs an LLM of at least 2 decoder layers (a stage at layer >= 1 scored by the layer before it); "
            f"this one has {num_layers}."
        )
    return scaled_layers(PAPER_LAYERS, num_layers, low=1, high=num_layers - 1, paper_depth=PAPER_DEPTH)


def stage_fractions(keep: float, budget: str, ratio: float | None, layers: tuple[int, ...],
                    num_layers: int) -> list[float]:
    """Visual share (of the original tokens) left after each stage: λ^m for budget "average" (λ solved), else
    keep·λ^(m-1) with λ = ``ratio`` or the code's 0.5."""
    if budget == "average":
        floor = layers[0] / num_layers
        if keep <= floor:
            raise ValueError(
                f"keep={keep} under budget='average' cannot be met with the first pdrop stage at layer {layers[0]} "
                f"of {num_layers}: the layers before it alone use {floor:.3f} of the full budget. Raise keep, give "
                f"an earlier first stage (layers=, e.g. starting at 1), or use budget='input'."
            )
        lam = solve_ratio(keep, layers, num_layers)
        return [lam ** (m + 1) for m in range(len(layers))]
    lam = OFFICIAL_RATIO if ratio is None else ratio
    return [keep * lam**m for m in range(len(layers))]


@register_pruner
class PDropPruner(Pruner):
    config_cls = PDropConfig
    paper = ("PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction "
             "(CVPR'25, arXiv 2410.17247)")
    status = "approximation"
    points = ("llm:K",)
    flash_compatible = True
    needs_training = "none"

    def plan(self, num_layers: int) -> list[Stage]:
        layers = self.config.layers if self.config.layers is not None else default_layers(num_layers)
        if layers[-1] >= num_layers:
            raise ValueError(
                f"pdrop's layers={layers} name decoder layer {layers[-1]}, but the model has {num_layers} decoder "
                f"layers (0..{num_layers - 1}). Give layers below {num_layers}, or None for the paper's stages "
                "scaled to this depth."
            )
        fractions = stage_fractions(self.config.keep, self.config.budget, self.config.ratio, layers, num_layers)
        return [Stage(Point("llm", layer), fraction) for layer, fraction in zip(layers, fractions, strict=True)]

    def select(self, ctx: PruneContext) -> Selection:
        return top_last_token_attention(ctx, "pdrop")


__all__ = ["PDropConfig", "PDropPruner", "default_layers", "stage_fractions"]
