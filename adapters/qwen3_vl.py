"""Qwen3-VL (``qwen3_vl``): Qwen2-VL's token layout plus DeepStack (shared/ADAPTERS.md §2.6).

The vision tower also merges the states of a few intermediate blocks (``deepstack_visual_indexes``) and the text
model adds level i to the visual rows of the hidden states after decoder layer i, through ``visual_pos_masks``
(B, L) and ``deepstack_visual_embeds`` (one (N_visual, D) tensor per level, rows in row-major order of the mask).
Pruning keeps them consistent with the kept visual tokens:

- at the LLM entry, both are gathered with the kept rows (``prune_llm_kwargs``);
- at ``llm:K`` with K below the DeepStack depth, decoder layers K.. hold fewer rows than the mask describes, so the
  text model's ``_deepstack_process`` is overridden on the instance (and restored by ``unwrap``) to gather the mask
  and the feature rows down to the rows the running layer holds.

A video's frames are separate placeholder runs with timestamp text in between; the video is still one entry whose
tokens are all its runs, in order, on the grid ``(t * h / merge, w / merge)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from vtprune.adapters.qwen2_vl import Qwen2VLAdapter
from vtprune.registry import register_adapter


def _gather_deepstack(mask: Tensor, embeds: list[Tensor], rows: Tensor, valid: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Keep the (B, M) ``rows`` of a (B, L) visual mask and the matching rows of every (N_visual, D) level."""
    mask = mask.to(rows.device)
    # Row of each visual token in the level tensors: the model packs them in row-major order of the mask.
    order = mask.flatten().cumsum(0).view_as(mask) - 1
    kept = mask.gather(1, rows) & valid
    picked = order.gather(1, rows)[kept]
    return kept, [level[picked.to(level.device)] for level in embeds]


class _RestoreAttribute:
    """Handle that deletes an instance attribute set over a class method, so the class method shows again."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        if self.name in vars(self.owner):
            delattr(self.owner, self.name)


@register_adapter("qwen3_vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    def family_hooks(self) -> list[Any]:
        handles = super().family_hooks()
        text_model = self.language_model
        original = text_model._deepstack_process

        def deepstack_process(hidden_states: Tensor, visual_pos_masks: Tensor, visual_embeds: Tensor) -> Tensor:
            rows = self.view.running_layer_rows()
            if rows is not None:
                visual_pos_masks, (visual_embeds,) = _gather_deepstack(visual_pos_masks, [visual_embeds], *rows)
            return original(hidden_states, visual_pos_masks, visual_embeds)

        text_model._deepstack_process = deepstack_process
        handles.append(_RestoreAttribute(text_model, "_deepstack_process"))
        return handles

    def prune_llm_kwargs(self, kwargs: dict[str, Any], index: Tensor, valid: Tensor) -> None:
        mask = kwargs.get("visual_pos_masks")
        if mask is None:
            return
        kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = _gather_deepstack(
            mask, kwargs["deepstack_visual_embeds"], index, valid
        )
