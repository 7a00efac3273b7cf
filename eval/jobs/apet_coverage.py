"""Why ApET gains little from a larger budget on the reference checkpoints: where its basis and its kept tokens lie.

    python -m vtprune.eval.jobs.apet_coverage --items 48      # CPU, about a minute

For each family (LLaVA, InternVL: one raster grid per image) and ``--items`` test items of one category, prints
- the share of ApET's farthest-point basis tokens that lie on an object (foreground: a token whose cell an object or
  glyph covers by more than 10%, from the generator's label maps),
- the mean reconstruction error of foreground and background tokens from that basis,
- for ``uniform``, ApET's selection alone and ApET, at each keep: the share of the foreground the kept tokens cover.
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers

import vtprune
from vtprune.eval import accuracy, reference, synth
from vtprune.pruners.apet import farthest_point_sampling, reconstruction_errors

SETTINGS = (("uniform", {}), ("apet[merge=false,inject=false]", {"merge": False, "inject": False}), ("apet", {}))


def foreground(spec: reference.FamilySpec, scenes: list[synth.Scene], tokens: int) -> torch.Tensor:
    side = math.isqrt(tokens)
    return accuracy.token_coverage(spec, scenes, side, "cpu")[0] > 0.1


def measure(family: str, category: str, items: int, keeps: tuple[float, ...]) -> dict:
    spec = reference.get_family(family)
    model = getattr(transformers, spec.model_class).from_pretrained(f"checkpoints/{family}", dtype=torch.float32)
    model.eval()
    batch = synth.split_items("test", category, items)
    inputs = reference.encode(spec, batch)
    scenes = [item.images[0] for item in batch]
    captured = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    x = captured[0].float().reshape(len(batch), -1, captured[0].shape[-1])
    fg = foreground(spec, scenes, x.shape[1])
    # ApET's defaults: basis of 10 by farthest-point sampling from the largest-norm token, ridge 1e-5.
    basis_index = farthest_point_sampling(x, 10, x.norm(dim=-1).argmax(1))
    basis = x.gather(1, basis_index[..., None].expand(-1, -1, x.shape[-1]))
    errors = reconstruction_errors(x, basis, 1e-5)
    result = {
        "foreground_share": float(fg.float().mean()),
        "basis_on_foreground": float(fg.gather(1, basis_index).float().mean()),
        "error_foreground": float(errors[fg].mean()),
        "error_background": float(errors[~fg].mean()),
        "foreground_covered": {},
    }
    for label, options in SETTINGS:
        method = label.split("[")[0]
        for keep in keeps:
            vtprune.wrap(model, method, keep=keep, **options)
            with torch.no_grad():
                model(**inputs)
            kept = model.vtprune.engine.last_stats.stages[0].kept
            vtprune.unwrap(model)
            covered = [fg[j, k].sum() / fg[j].sum().clamp(min=1) for j, k in enumerate(kept)]
            result["foreground_covered"][f"{label}@{keep}"] = float(torch.stack(covered).mean())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="llava,internvl")
    parser.add_argument("--category", default="count")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--keeps", default="0.11,0.33")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    keeps = tuple(float(k) for k in args.keeps.split(","))
    for family in args.families.split(","):
        r = measure(family, args.category, args.items, keeps)
        print(f"{family}: foreground {100 * r['foreground_share']:.0f}% of tokens; basis on foreground "
              f"{100 * r['basis_on_foreground']:.0f}%; mean error foreground {r['error_foreground']:.3f}, "
              f"background {r['error_background']:.3f}")
        for name, share in r["foreground_covered"].items():
            print(f"  {name:40s} covers {100 * share:.0f}% of the foreground")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
