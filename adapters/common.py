"""Facts several families share, as small mixins a family file lists among its bases (never one family's methods
borrowed by another).

- ``TokenwiseProjector``: a token-wise projector at ``model.model.multi_modal_projector`` (LLaVA's MLP, InternVL's
  LayerNorm + MLP): the ``encoder`` point reads its input, the ``projector`` point its output, one record per
  projector call, and encoder-point values map into the LLM through it exactly.
- ``ClipTowerCls``: a CLIP or SigLIP tower at ``model.model.vision_tower`` (CLIP prepends a CLS token, SigLIP has
  none); its CLS attention row is read at the last layer, which transformers runs even where the features come
  from layer -2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class TokenwiseProjector:
    inner: nn.Module

    def capture_hook(self, point: str, store: Callable[[Tensor], None]) -> Any:
        projector = self.inner.multi_modal_projector
        if point == "encoder":
            return projector.register_forward_pre_hook(lambda module, args: store(args[0]))
        return projector.register_forward_hook(lambda module, args, output: store(output))

    def project(self, encoder_features: Tensor) -> Tensor:
        with torch.no_grad():
            return self.inner.multi_modal_projector(encoder_features[None])[0]


class ClipTowerCls:
    inner: nn.Module

    def _vision_model(self) -> nn.Module:
        tower = self.inner.vision_tower
        return getattr(tower, "vision_model", tower)

    def _tower_has_cls(self) -> bool:
        return getattr(self._vision_model().embeddings, "class_embedding", None) is not None

    def vision_cls_attention(self) -> nn.Module | None:
        if not self._tower_has_cls():
            return None
        return self._vision_model().encoder.layers[-1].self_attn
