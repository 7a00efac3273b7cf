"""Why does a reference recipe not learn? Train variants of one family side by side on one GPU and compare their
learning curves (running per-category accuracy every ``--log-every`` steps).

    python -m vtprune.eval.jobs.recipe_ablation --minutes 5 --out "$OUT/ablation.json"                   # on a GPU
    python -m vtprune.eval.jobs.recipe_ablation --minutes 0.2 --variants base,depth4 --batch 2 --out /tmp/a.json

Each variant is the v2 recipe (``train_reference.RecipeConfig``) with a few fields changed (``VARIANTS``), trained
from scratch for the same wall-clock minutes in its own worker process (``fanout``); no checkpoint is kept. The
variants share the GPU, so compare them with each other, not with a run that had the GPU alone (the steps each
made are in the output).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vtprune.eval.jobs import fanout

# name -> RecipeConfig fields that differ from the v2 recipe. All go straight to VQA (no dense phase), so that a
# short call spends its time on the phase that did not learn.
VARIANTS: dict[str, dict] = {
    "base": {},  # the recipe as it is (12-layer LLM, lr 8e-4, captions mixed in at caption_share)
    "no-caption": {"caption_share": 0.0},  # run 2's VQA phase
    "depth4": {"text_layers": 4},  # v1's depth: is depth the cause?
    "depth4-no-caption": {"text_layers": 4, "caption_share": 0.0},
    "caption-0.6": {"caption_share": 0.6},
    "question-first": {"question_first": True, "caption_share": 0.0},  # v1's prompt order
    "question-first-caption": {"question_first": True},
    # The object-biased token-drop curriculum: whole images from half-way through (drop_fraction 0.5).
    "drop": {"drop_keep": 0.11},
    "drop-no-caption": {"drop_keep": 0.11, "caption_share": 0.0},
    # Run on 2026-12-02 (eval/results/v2_run2/ablation.json, with no captions then): all at chance after 300-600
    # steps, too few to tell them apart.
    "lr3e-4": {"lr": 3e-4, "caption_share": 0.0},
    "lr2e-3": {"lr": 2e-3, "caption_share": 0.0},
    "no-incontext": {"categories": ("colour", "shape", "exist", "position", "count", "text"), "caption_share": 0.0},
    "easy": {"categories": ("exist", "position", "count"), "caption_share": 0.0},
    # Dense pre-training only (the whole call; ends early if the shape and glyph gates are met): does the CLIP /
    # InternViT tower learn shape and glyphs per patch with a 2-D sine-cosine position init, or with transformers'
    # init (run 3: ~60% shape, ~10% glyph after 1,442 steps)?
    "dense-default": {"dense_fraction": 1.0, "position_init": "default"},
    "dense-sincos": {"dense_fraction": 1.0, "position_init": "sincos"},
    "dense-sincos-w20": {"dense_fraction": 1.0, "position_init": "sincos", "object_weight": 20.0},
    # Run 4's first ablation: the position init changed nothing, weight 20 helped a little; is the tower's learning
    # rate too low from scratch, and does InternVL learn shape / glyph once its heads read the 2 x 2 merged groups
    # its LLM consumes (as Qwen's, which reached 99.8% shape)?
    "dense-w20-vlr1": {"dense_fraction": 1.0, "object_weight": 20.0, "vision_lr_scale": 1.0},
    "dense-merged-w20": {"dense_fraction": 1.0, "object_weight": 20.0, "dense_point": "merged"},
    "dense-merged-w20-vlr1": {"dense_fraction": 1.0, "object_weight": 20.0, "dense_point": "merged",
                              "vision_lr_scale": 1.0},
    # Run 4's second ablation: shape rises with weight 20 / full lr / merged read-out, glyphs never start (7-14%),
    # where Qwen's windowed, 2-D-RoPE tower learns them. A locality prior at init (``init_local_attention``): at gain
    # 1.0 head 0 of a fresh tower attends within ~2-3 patches, at 1.25 within ~0.5 and heads 1-2 at 8-12.
    "dense-local1-w20-vlr1": {"dense_fraction": 1.0, "object_weight": 20.0, "vision_lr_scale": 1.0,
                              "local_attention_gain": 1.0},
    "dense-local1.25-w20-vlr1": {"dense_fraction": 1.0, "object_weight": 20.0, "vision_lr_scale": 1.0,
                                 "local_attention_gain": 1.25},
    "dense-merged-local1-w20-vlr1": {"dense_fraction": 1.0, "object_weight": 20.0, "dense_point": "merged",
                                     "vision_lr_scale": 1.0, "local_attention_gain": 1.0},
    "dense-merged-local1.25-w20-vlr1": {"dense_fraction": 1.0, "object_weight": 20.0, "dense_point": "merged",
                                        "vision_lr_scale": 1.0, "local_attention_gain": 1.25},
}
DEFAULT_VARIANTS = ("base", "question-first-caption", "drop", "drop-no-caption")


def run_variant(family: str, name: str, fields: dict, minutes: float, batch: int | None, log_every: int,
                batch_dense: int | None = None) -> dict:
    import torch

    from vtprune.eval.train_reference import RecipeConfig, train

    torch.set_num_threads(2)  # the workers share the host's cores
    options = {"dense_fraction": 0.0, "log_every": log_every, **fields}
    if batch is not None:
        options["batch"] = batch
    if batch_dense is not None:
        options["batch_dense"] = batch_dense
    config = RecipeConfig(family=family, minutes=minutes, **options)
    with tempfile.TemporaryDirectory() as work:
        notes = train(config, Path(work) / name)
    return {"variant": name, "fields": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            "steps": notes["steps"], "running_metrics": notes["running_metrics"], "log": notes["log"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava", choices=("llava", "qwen2_5_vl", "internvl"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch", type=int, help="items per VQA batch (default: the recipe's)")
    parser.add_argument("--batch-dense", type=int, help="images per dense batch (default: the recipe's)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not names:
        parser.error(f"unknown or no variants {unknown}; choose from {list(VARIANTS)}.")
    if args.minutes <= 0 or any(b is not None and b < 1 for b in (args.batch, args.batch_dense)) \
            or args.log_every < 1:
        parser.error("--minutes must be > 0, --batch, --batch-dense and --log-every at least 1.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tasks = [fanout.Task(name, run_variant, dict(family=args.family, name=name, fields=VARIANTS[name],
                                                 minutes=args.minutes, batch=args.batch, log_every=args.log_every,
                                                 batch_dense=args.batch_dense))
             for name in names]
    outcomes = fanout.run(tasks, jobs=len(tasks))
    result = {"family": args.family, "minutes": args.minutes,
              "variants": {o.name: o.value if o.ok else {"error": o.error} for o in outcomes}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    failed = [o.name for o in outcomes if not o.ok]
    print(json.dumps({"failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
