"""Train a reference checkpoint of one family on the synth set (run on the lent GPU; see eval/results/TRAINING.md).

    python -m vtprune.eval.train_reference --family llava --minutes 8 --out checkpoints/llava

Recipe (what made the yardstick discriminate in the first experiments; see issue 4):
1. dense vision pre-training: linear heads on the visual features the LLM consumes predict, for every patch, the
   colour, shape and glyph under it (targets the generator knows). Without it a tiny VLM learns answer priors only;
2. VQA: the whole model on single-word answers (loss on the answer and the end-of-sequence token), the vision side
   at ``vision_lr_scale`` of the learning rate, categories in round-robin, answers balanced per category.

Seeded, with a progress bar, bf16 autocast through accelerate. The budget is wall-clock time, so the same command
fits a lease. ``--resume DIR`` continues from a saved checkpoint (its weights; the optimizer restarts, since the
device machine keeps nothing between calls and only small files come back).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from vtprune.eval import reference, synth


@dataclass
class TrainConfig:
    family: str
    minutes: float = 8.0
    pretrain_fraction: float = 0.3
    lr: float = 8e-4
    vision_lr_scale: float = 0.3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    batch_image: int = 64
    batch_multi: int = 24
    batch_video: int = 32
    seed: int = 0


def _batch_size(config: TrainConfig, category: str) -> int:
    if category in synth.MULTI_CATEGORIES:
        return config.batch_multi
    if category in synth.VIDEO_CATEGORIES:
        return config.batch_video
    return config.batch_image


class DenseHeads(nn.Module):
    """Per-patch colour / shape / glyph classifiers on the visual features (``sub`` sub-patches per token)."""

    def __init__(self, width: int, sub: int = 1) -> None:
        super().__init__()
        self.sub = sub
        self.colour = nn.Linear(width, sub * (len(synth.COLOURS) + 1))
        self.shape = nn.Linear(width, sub * (len(synth.SHAPES) + 2))
        self.char = nn.Linear(width, sub * (len(synth.CHARS) + 1))

    def loss(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        total, correct, count = 0.0, 0, 0
        for name in ("colour", "shape", "char"):
            logits = getattr(self, name)(features.float())
            logits = logits.reshape(-1, logits.shape[-1] // self.sub)
            target = labels[name].reshape(-1)
            total = total + nn.functional.cross_entropy(logits, target)
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
        return total, correct / count


def dense_features(family: str, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int, int]:
    """(tokens, width) visual features, the grid side of the label map, and sub-patches per token."""
    inner = model.model
    if family == "llava":
        out = inner.vision_tower(batch["pixel_values"], output_hidden_states=True)
        return out.hidden_states[model.config.vision_feature_layer][:, 1:], 24, 1
    if family == "internvl":
        out = inner.vision_tower(batch["pixel_values"], output_hidden_states=True)
        return out.hidden_states[-1][:, 1:], 32, 1
    merged = inner.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    return merged, 24, 4


def dense_labels(family: str, scenes: list[synth.Scene], grid: int, device) -> dict[str, torch.Tensor]:
    labels = synth.label_maps(scenes, grid, device)
    if family == "qwen2_5_vl":
        # Merged token (i, j) covers patches (2i..2i+1, 2j..2j+1), its 4 sub-patches in row-major order.
        half = grid // 2
        labels = {k: v.view(-1, half, 2, half, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4) for k, v in labels.items()}
    return labels


def vision_parameters(family: str, model: nn.Module) -> list[nn.Parameter]:
    inner = model.model
    modules = [inner.visual] if family == "qwen2_5_vl" else [inner.vision_tower, inner.multi_modal_projector]
    return [p for m in modules for p in m.parameters()]


def save(model: nn.Module, spec: reference.FamilySpec, out: Path, notes: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = reference.build_tokenizer(spec)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 4
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    reference.build_processor(spec, tokenizer).save_pretrained(out)
    (out / "training.json").write_text(json.dumps(notes, indent=2) + "\n")


def train(config: TrainConfig, out: Path, resume: Path | None = None) -> dict:
    import transformers
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    spec = reference.get_family(config.family)
    torch.manual_seed(config.seed)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    model_cls = getattr(transformers, spec.model_class)
    if resume is not None:
        model = model_cls.from_pretrained(resume, dtype=torch.float32)
    else:
        model = model_cls._from_config(reference.build_config(spec), dtype=torch.float32)
    model.to(device).train()
    width = model.config.vision_config.hidden_size if config.family != "qwen2_5_vl" else (
        model.config.vision_config.out_hidden_size)
    heads = DenseHeads(width, sub=4 if config.family == "qwen2_5_vl" else 1).to(device)

    vision = {id(p) for p in vision_parameters(config.family, model)}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in vision], "lr_scale": config.vision_lr_scale},
        {"params": [p for p in model.parameters() if id(p) not in vision], "lr_scale": 1.0},
        {"params": list(heads.parameters()), "lr_scale": 1.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    model, heads, optimizer = accelerator.prepare(model, heads, optimizer)

    budget = config.minutes * 60
    pretrain_budget = budget * config.pretrain_fraction if resume is None else 0.0
    image_stream = synth.train_stream(synth.IMAGE_CATEGORIES, seed=config.seed + 1)
    streams = {c: synth.train_stream((c,), seed=config.seed) for c in spec.categories}
    started = time.time()
    step, phase = 0, "dense"
    log = []
    bar = tqdm(total=int(budget), unit="s", desc=f"{config.family} dense")
    running = {}
    while True:
        elapsed = time.time() - started
        if elapsed >= budget:
            break
        if phase == "dense" and elapsed >= pretrain_budget:
            phase = "vqa"
            bar.set_description(f"{config.family} vqa")
        # Warm-up, then cosine over the time budget of the current phase.
        if phase == "dense":
            progress = elapsed / max(pretrain_budget, 1e-6)
        else:
            progress = (elapsed - pretrain_budget) / max(budget - pretrain_budget, 1e-6)
        scale = min(1.0, (step + 1) / config.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        scale = max(scale, 0.02)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * scale * (1.0 if phase == "dense" else group["lr_scale"])

        with accelerator.autocast():
            if phase == "dense":
                items = [next(image_stream) for _ in range(config.batch_image)]
                batch = reference.encode(spec, items, device)
                features, grid, _ = dense_features(config.family, model, batch)
                labels = dense_labels(config.family, [it.images[0] for it in items], grid, device)
                loss, accuracy = heads.loss(features, labels)
                metric = ("patch_acc", accuracy)
            else:
                category = spec.categories[step % len(spec.categories)]
                items = [next(streams[category]) for _ in range(_batch_size(config, category))]
                batch = reference.encode(spec, items, device, with_answers=True)
                output = model(**batch)
                loss = output.loss
                logits = output.logits[:, -3]
                metric = (f"acc_{category}", float((logits.argmax(-1) == batch["labels"][:, -2]).float().mean()))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        name, value = metric
        running[name] = 0.95 * running.get(name, value) + 0.05 * value
        step += 1
        if step % 20 == 0:
            bar.update(int(time.time() - started) - bar.n)
            bar.set_postfix(loss=f"{float(loss):.3f}", **{k: f"{v:.2f}" for k, v in running.items()})
        if step % 200 == 0:
            log.append({"step": step, "seconds": round(time.time() - started, 1), "phase": phase,
                        "loss": round(float(loss), 4), **{k: round(v, 4) for k, v in running.items()}})
    bar.close()
    notes = {
        "family": config.family,
        "config": asdict(config),
        "resumed_from": str(resume) if resume else None,
        "steps": step,
        "minutes": round((time.time() - started) / 60, 2),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "running_metrics": {k: round(v, 4) for k, v in running.items()},
        "log": log,
    }
    save(accelerator.unwrap_model(model).eval(), spec, out, notes)
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(reference.FAMILIES))
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    notes = train(TrainConfig(family=args.family, minutes=args.minutes, seed=args.seed), args.out, args.resume)
    print(json.dumps({k: v for k, v in notes.items() if k != "log"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
