"""Mean visual tokens a method keeps on a reference checkpoint, with and without a trained config's learned heads.

    python -m vtprune.eval.jobs.kept_counts --method atp --per-category 16 \\
        --heads-config eval/results/calibrated/atp_heads_default_llava_v1.json \\
        --heads-config eval/results/calibrated/atp_heads_layer2_llava_v1.json --out counts.json

For each ``--heads-config`` (a config saved by ``vtprune.train``'s ``result.method_config``) and each ``--keeps``
entry, wraps the model with the config's options at that keep, once without its heads (the training-free rule) and
once with them, runs ``--per-category`` val items of each image category and records the mean K_in and K_avg
(``last_stats``) with the K_avg range. Learned thresholds are trained against a soft budget; this says what the hard
drops keep at inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava")
    parser.add_argument("--checkpoint", type=Path, help="default: checkpoints/<family>")
    parser.add_argument("--method", default="atp")
    parser.add_argument("--heads-config", type=Path, action="append", required=True)
    parser.add_argument("--keeps", default="0.11,0.22,0.33")
    parser.add_argument("--per-category", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    keeps = [float(k) for k in args.keeps.split(",")]
    if any(not 0.0 < k <= 1.0 for k in keeps):
        parser.error(f"--keeps {args.keeps}: each keep must be in (0, 1].")
    for path in args.heads_config:
        if not path.is_file():
            parser.error(f"--heads-config {path} does not exist.")

    import transformers

    import vtprune
    from vtprune.config import PrunerConfig
    from vtprune.eval import reference, synth

    spec = reference.get_family(args.family)
    checkpoint = args.checkpoint or Path("checkpoints") / args.family
    model = getattr(transformers, spec.model_class).from_pretrained(checkpoint, dtype=torch.float32).eval()
    categories = [c for c in spec.categories if c != "incontext"]
    items = [item for c in categories for item in synth.split_items("val", c, args.per_category)]
    out = {}
    for path in args.heads_config:
        trained = PrunerConfig.load(path)
        if trained.method != args.method:
            parser.error(f"{path} is a '{trained.method}' config, not '{args.method}'.")
        options = {k: v for k, v in trained.to_dict().items() if k not in ("method", "version", "keep", "heads")}
        for keep in keeps:
            for label, heads in (("tf", None), ("trained", trained.heads)):
                vtprune.wrap(model, args.method, keep=keep, heads=heads, **options)
                k_in, k_avg = [], []
                for start in range(0, len(items), args.batch):
                    with torch.no_grad():
                        model(**reference.encode(spec, items[start:start + args.batch], "cpu"))
                    for sample in model.vtprune.last_stats["samples"]:
                        k_in.append(sample["K_in"])
                        k_avg.append(sample["K_avg"])
                vtprune.unwrap(model)
                key = f"{path.stem}@{keep}/{label}"
                out[key] = {"K_in_mean": sum(k_in) / len(k_in), "K_avg_mean": sum(k_avg) / len(k_avg),
                            "K_avg_min": min(k_avg), "K_avg_max": max(k_avg)}
                print(key, out[key], flush=True)
    command = "python -m vtprune.eval.jobs.kept_counts " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "counts": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
