"""Where visual tokens sit in a prompt: the facts a family states and the engine reads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ImageLayout:
    """Where one image's tokens sit in the prompt.

    Attributes:
        sample: batch row.
        index_in_sample: order of the image within its prompt.
        positions: (n,) positions of its prunable tokens in the original sequence, in the order the model scattered
            them. Visual slots that no image lists (layout tokens such as AnyRes row newlines) are always kept.
        grid: (rows, cols) token grid, or None.
        kind: "image" or "video" (a video is one entry; its adapter says how its frames map onto ``grid``).
    """

    sample: int
    index_in_sample: int
    positions: Tensor
    grid: tuple[int, int] | None
    kind: str = "image"


def encoded_index(images: list[ImageLayout], encoded: dict[str, int], by_kind: bool = True) -> list[int]:
    """For each image (batch-major), the index of its features among the ``encoded[kind]`` features the vision
    tower produced for its kind, in scatter order (``by_kind=False``: one list for all kinds, keyed "image").

    From transformers 5.18 ``generate`` encodes each prompt once and only then repeats every prompt ``k`` times
    (``num_beams``, ``num_return_sequences``; rows b*k .. b*k+k-1 are copies of prompt b), so the copies share their
    prompt's features. Without such a repeat this is 0, 1, 2, ... per kind.
    """
    kinds = [image.kind if by_kind else "image" for image in images]
    counts = [(kinds.count(kind), n) for kind, n in encoded.items() if n]
    repeat = 1
    if counts and all(have % n == 0 for have, n in counts) and len({have // n for have, n in counts}) == 1:
        repeat = max(1, counts[0][0] // counts[0][1])
    cursor = dict.fromkeys(encoded, 0)
    first = dict(cursor)
    row = -1
    out = []
    for image, kind in zip(images, kinds, strict=True):
        if image.sample != row:
            row = image.sample
            if row % repeat == 0:
                first = dict(cursor)
            else:
                cursor = dict(first)
        out.append(cursor[kind])
        cursor[kind] += 1
    return out
