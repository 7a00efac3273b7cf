"""ApET: approximation-error guided token compression (Ma et al., CVPR 2026, arXiv 2602.19870).

Paper: "ApET: Approximation-Error Guided Token Compression for Efficient VLMs"; official code
github.com/MaQianKun0/ApET (MIT), read for this re-implementation (shared/METHODS.md §5); no code was copied.

One compression step, on the (n, C) features of one image, keeping K tokens:
1. basis: b tokens picked by farthest-point sampling (squared Euclidean distance);
2. every token is approximated by ridge least squares on the basis, ``w = (B Bᵀ + λI)⁻¹ B x``, in fp32, and scored
   by its error ``‖x − Bᵀw‖``;
3. the K largest errors are kept (the basis tokens themselves have error ≈ 0 and would be lost);
4. the basis vectors are written into the b lowest-error kept slots ("overwrite", the LLaVA code) or averaged
   0.5 / 0.5 with them ("average", the Qwen code);
5. every dropped token is merged (mean) into its most cosine-similar kept token that did not receive a basis vector.

Stages (``plan``). ``budget="input"``: one step before the LLM keeping K₁ = keep·n. ``budget="average"`` (the
paper's tables): a step before the LLM and a second one on the hidden states at the input of decoder layer
``llm_layer`` (16 of 32 in the code), with the code's 3 : 1 split, K₁ = 1.5·K̄ and K₂ = 0.5·K̄ at ``llm_layer = L/2``,
so that the mean over layers is K̄. Other layers keep K₁ = 3·K₂ and solve K₂ from the mean; where that would make
K₁ > n, K₁ = n and K₂ takes the rest.

Faithful to the official code: FPS basis of 10, ridge λ = 1e-5 (stage 1 and LLaVA's LLM stage), top-K by error,
basis injection into the lowest-error survivors (in index order before the LLM, in error order inside it, as the
code's mask assignment and index assignment do), the mean merge ``(x + Σ assigned) / (1 + count)``, the 96 / 32 and
288 / 96 splits, the LLM stage after decoder layer 15 (input of layer 16).

Defaults per family, as the two official codes (``official_defaults``; every field can be set explicitly):
- LLaVA code (llava, llava_next, llava_onevision; internvl, whose token-wise projector takes encoder-point values
  the same way — our choice, the code has no InternVL version): ``stage1_point="encoder"`` (CLIP features before
  the projector; written values go through it), ``blend="overwrite"``, ``positions="renumber"`` (the code prunes
  before the LLM, so survivors get contiguous positions), ``llm_lambda=1e-5``.
- Qwen code (qwen2_vl, qwen2_5_vl, qwen3_vl): ``stage1_point="projector"``, ``blend="average"`` (0.5 / 0.5),
  ``positions="original"`` (M-RoPE positions are gathered), ``llm_lambda=0.1``.

Differs:
- FPS starts, by default (``seed=None``), at the token of largest norm, for determinism; the code draws the start
  with ``torch.randint``. ``seed=<int>`` draws it from a generator seeded per image.
- Positions: "renumber" renumbers the survivors of the step before the LLM; the LLM step keeps the positions its
  rows had (the LLaVA code renumbers again after its LLM stage).
- The released Qwen code has its LLM stage commented out, i.e. it runs stage 1 only (``budget="input"``, our
  default on every family); ``budget="average"`` runs the paper's two stages.
- With K ≤ basis_size (tiny budgets the code never runs) the basis shrinks to b = K − 1 tokens so that at least one
  kept token can take merges; b = 0 (K = 1) keeps the largest-norm token and merges everything into it.
- LLaVA-NeXT: one selection over all the tokens of an image (base + unpadded tiles); the code selects per 576-token
  crop before unpadding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vtprune.budget import stage_fraction
from vtprune.config import AUTO, PrunerConfig
from vtprune.point import Point
from vtprune.pruners.base import Pruner
from vtprune.registry import register_pruner
from vtprune.state import PruneContext, Selection, Stage

STAGE1_POINTS = ("encoder", "projector")
BLENDS = ("overwrite", "average")
# The choices of the two official codes (see the module docstring); "*" = LLaVA's, for every non-Qwen family.
LLAVA_CODE = {"stage1_point": "encoder", "blend": "overwrite", "positions": "renumber", "llm_lambda": 1e-5}
QWEN_CODE = {"stage1_point": "projector", "blend": "average", "positions": "original", "llm_lambda": 0.1}


@dataclass(frozen=True)
class ApETConfig(PrunerConfig):
    """Attributes:
    basis_size: basis tokens per image and stage (the code's ``basis_token_num``, 10).
    stage1_lambda: ridge λ of the step before the LLM (1e-5 in the code).
    llm_lambda: ridge λ of the step inside the LLM: 1e-5 in the LLaVA code, 1e-1 in the Qwen code (None: the
        code's value for the model's family).
    llm_layer: decoder layer at whose input the second step runs under ``budget="average"``; None = round(L/2)
        (16 of 32 as in the code; 2 of the 4-layer test models). Must be in 1..L-1.
    stage1_point: "projector" (after the projector, in LLM space; Qwen's point) or "encoder" (CLIP features
        before the projector, the LLaVA code's point; written values then go through the projector); "auto": the
        official code's point for the model's family.
    seed: None starts farthest-point sampling at the token of largest norm (deterministic); an int draws the
        start per image from a generator seeded by (seed, image index within its prompt), like the code's randint.
    blend: how basis vectors enter their slots: "overwrite" (LLaVA code) or "average" (0.5 / 0.5, Qwen code);
        "auto": the official code's for the model's family.
    merge: average every dropped token into its most similar survivor (step 5); False keeps survivors as they are
        (ablation).
    inject: write the basis vectors into the lowest-error survivors (step 4); False keeps those survivors as they
        are (ablation). With both False, ApET is its error-based selection alone.
    """

    method = "apet"
    basis_size: int = 10
    stage1_lambda: float = 1e-5
    llm_lambda: float | None = None
    llm_layer: int | None = None
    stage1_point: str = AUTO
    seed: int | None = None
    blend: str = AUTO
    merge: bool = True
    inject: bool = True
    positions: str = AUTO

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.basis_size, bool) or not isinstance(self.basis_size, int):
            raise TypeError(f"basis_size must be an int, got {type(self.basis_size).__name__}.")
        if self.basis_size < 1:
            raise ValueError(f"basis_size={self.basis_size} must be at least 1 (the paper uses 10).")
        for name in ("stage1_lambda", "llm_lambda"):
            value = getattr(self, name)
            if value is None and name == "llm_lambda":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}.")
            if not value > 0:
                raise ValueError(f"{name}={value} must be > 0: the ridge term keeps the basis Gram matrix invertible.")
        if self.llm_layer is not None:
            if isinstance(self.llm_layer, bool) or not isinstance(self.llm_layer, int):
                raise TypeError(f"llm_layer must be an int or None, got {type(self.llm_layer).__name__}.")
            if self.llm_layer < 1:
                raise ValueError(
                    f"llm_layer={self.llm_layer} must be >= 1: the second step runs inside the LLM, after the "
                    "first one at its entry. Use budget='input' for a single step before the LLM."
                )
        if self.stage1_point not in (*STAGE1_POINTS, AUTO):
            raise ValueError(f"stage1_point={self.stage1_point!r} is not one of {[*STAGE1_POINTS, AUTO]}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}.")
        if self.blend not in (*BLENDS, AUTO):
            raise ValueError(f"blend={self.blend!r} is not one of {[*BLENDS, AUTO]}.")
        for name in ("merge", "inject"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")


def farthest_point_sampling(x: Tensor, count: int, start: Tensor) -> Tensor:
    """(B, n, C) features, (B,) start indices -> (B, count) indices picked by farthest-point sampling.

    Each step adds the token whose squared Euclidean distance to the picked set is largest (the code's ``fps``).
    """
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    picks = [start]
    dist = torch.full((batch, n), float("inf"), device=x.device, dtype=x.dtype)
    for _ in range(count - 1):
        dist = torch.minimum(dist, (x - x[rows, picks[-1]][:, None]).pow(2).sum(-1))
        picks.append(dist.argmax(dim=1))
    return torch.stack(picks, dim=1)


def reconstruction_errors(x: Tensor, basis: Tensor, lam: float) -> Tensor:
    """(B, n, C) tokens, (B, b, C) basis -> (B, n) ridge least-squares errors ``‖x − Bᵀ (BBᵀ + λI)⁻¹ B x‖``, fp32.

    One batched (b x b) solve for all tokens; b = 0 means no basis, i.e. the error is the norm.
    """
    x = x.float()
    if basis.shape[1] == 0:
        return x.norm(dim=-1)
    basis = basis.float()
    gram = basis @ basis.transpose(1, 2)
    gram = gram + lam * torch.eye(gram.shape[-1], device=x.device, dtype=gram.dtype)
    # solve_ex: the ridge term keeps the system well posed, and skipping solve's error check avoids a device sync.
    weights = torch.linalg.solve_ex(gram, basis @ x.transpose(1, 2))[0]  # (B, b, n)
    return (x - weights.transpose(1, 2) @ basis).norm(dim=-1)


def compress(
    x: Tensor, keep: int, basis_size: int, lam: float, start: Tensor, blend: str = "overwrite",
    slot_order: str = "index", merge: bool = True, inject: bool = True,
) -> tuple[Tensor, Tensor]:
    """One ApET step on a group of images of the same size.

    Args:
        x: (B, n, C) features.
        keep: K, tokens kept per image, 1 <= K < n.
        basis_size: largest basis; the basis used is b = min(basis_size, K - 1).
        lam: ridge λ.
        start: (B,) index where farthest-point sampling starts.
        blend: "overwrite" or "average" (see ``ApETConfig``).
        slot_order: which basis vector goes to which of the b lowest-error kept slots: "index" (the i-th basis
            vector to the slot with the i-th smallest token index, as the code's boolean-mask assignment before the
            LLM) or "error" (in descending error order, as the code's index assignment inside the LLM).
        merge, inject: steps 5 and 4 of the method (see ``ApETConfig``); off only for ablations.

    Returns:
        keep (B, K) indices into the n tokens, by descending error; values (B, K, C) in x's dtype, in that order.
    """
    batch, n, channels = x.shape
    b = min(basis_size, keep - 1, n)
    xf = x.float()
    basis_idx = farthest_point_sampling(xf, b, start) if b > 0 else start[:, None][:, :0]
    basis = xf.gather(1, basis_idx[..., None].expand(-1, -1, channels))
    errors = reconstruction_errors(xf, basis, lam)
    order = errors.topk(keep, dim=1).indices  # descending error: the code's ``errors_indices``
    targets = keep - b
    values = xf.gather(1, order[..., None].expand(-1, -1, channels))

    # Merge: each dropped token joins its most cosine-similar kept token that receives no basis vector.
    kept_mask = torch.zeros(batch, n, dtype=torch.bool, device=x.device).scatter_(1, order, True)
    dropped = torch.argsort(kept_mask.to(torch.int8), dim=1, stable=True)[:, : n - keep]
    dropped_x = xf.gather(1, dropped[..., None].expand(-1, -1, channels))
    target_x = values[:, :targets]
    similarity = F.normalize(dropped_x, dim=-1) @ F.normalize(target_x, dim=-1).transpose(1, 2)
    nearest = similarity.argmax(dim=-1)  # (B, n - K)
    sums = torch.zeros_like(target_x).scatter_add_(1, nearest[..., None].expand(-1, -1, channels), dropped_x)
    counts = torch.zeros(batch, targets, device=x.device).scatter_add_(1, nearest, torch.ones_like(similarity[..., 0]))
    merged = (target_x + sums) / (1 + counts)[..., None] if merge else target_x

    # Basis injection into the b lowest-error survivors.
    slots = values[:, targets:]
    if slot_order == "index":
        rank = torch.argsort(order[:, targets:], dim=1)
        placed = torch.empty_like(basis).scatter_(1, rank[..., None].expand(-1, -1, channels), basis)
    else:
        placed = basis
    injected = placed if blend == "overwrite" else 0.5 * placed + 0.5 * slots
    if not inject:
        injected = slots
    return order, torch.cat((merged, injected), dim=1).to(x.dtype)


@register_pruner
class ApETPruner(Pruner):
    config_cls = ApETConfig
    paper = "ApET: Approximation-Error Guided Token Compression for Efficient VLMs (CVPR'26, arXiv 2602.19870)"
    status = "faithful"
    points = ("encoder", "projector", "llm:K")
    flash_compatible = True
    needs_training = "none"
    official_defaults = {
        **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), QWEN_CODE),
        "*": LLAVA_CODE,
    }

    def llm_layer(self, num_layers: int) -> int:
        layer = self.config.llm_layer if self.config.llm_layer is not None else round(num_layers / 2)
        if not 1 <= layer < num_layers:
            raise ValueError(
                f"ApET's llm_layer={layer} is outside 1..{num_layers - 1} for a model with {num_layers} decoder "
                "layers. Pick a layer inside the LLM, or use budget='input' (a single step before the LLM)."
            )
        return layer

    def plan(self, num_layers: int) -> list[Stage]:
        keep, point = self.config.keep, self.config.stage1_point
        if point == AUTO:
            raise ValueError(
                "apet's stage1_point is 'auto' (the official code's point for the model's family): wrap the model "
                "to resolve it, or pass stage1_point='encoder' or 'projector'."
            )
        if self.config.budget == "input":
            return [Stage(point)]
        layer = self.llm_layer(num_layers)
        # K1 : K2 = 3 : 1 as in the released scripts, solved so that the mean over the L layers is keep.
        second = keep * num_layers / (2 * layer + num_layers)
        first = 3 * second
        if first > 1.0:
            first = 1.0
            second = stage_fraction(keep, "average", layer, num_layers)
        return [Stage(point, first), Stage(Point("llm", layer), second)]

    def select(self, ctx: PruneContext) -> Selection:
        unresolved = [name for name in ("blend", "llm_lambda") if getattr(self.config, name) in (AUTO, None)]
        if unresolved:
            raise ValueError(
                f"apet's {unresolved} are left to the official code of the model's family: wrap the model (which "
                "resolves them), call pruner.resolve(model_type), or set them."
            )
        inside = ctx.point.kind == "llm"
        lam = self.config.llm_lambda if inside else self.config.stage1_lambda
        keep = [torch.arange(image.num_tokens, device=ctx.device) for image in ctx.images]
        values: list[Tensor | None] = [None] * len(ctx.images)
        for group in ctx.image_groups():
            first = ctx.images[group[0]]
            if first.budget >= first.num_tokens:
                continue  # images this stage leaves whole go on unchanged: no basis injection and no merge
            x = torch.stack([ctx.images[j].features for j in group])
            start = self._start(ctx, group, x)
            order, merged = compress(
                x, first.budget, self.config.basis_size, lam, start, self.config.blend,
                slot_order="error" if inside else "index", merge=self.config.merge, inject=self.config.inject,
            )
            for row, j in enumerate(group):
                keep[j], values[j] = order[row], merged[row]
        return Selection(keep=keep, values=values if any(v is not None for v in values) else None)

    def _start(self, ctx: PruneContext, group: list[int], x: Tensor) -> Tensor:
        if self.config.seed is None:
            return x.float().norm(dim=-1).argmax(dim=1)
        starts = []
        for j in group:
            image = ctx.images[j]
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + image.index_in_sample)
            starts.append(torch.randint(image.num_tokens, (1,), generator=generator))
        return torch.cat(starts).to(x.device)
