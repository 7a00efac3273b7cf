"""Where a training step of the v2 reference recipe spends its time: rendering + encoding, forward + backward +
optimizer, per family and batch size, alone or with the three families sharing the GPU (as ``jobs.reference`` runs).

    python -m vtprune.eval.jobs.train_probe --batches 64,256 --out "$OUT/train_probe.json"         # on a GPU
    python -m vtprune.eval.jobs.train_probe --families llava --batches 4 --steps 2 --out /tmp/p.json  # smoke, CPU

Random weights (a step's time does not depend on them), the recipe's own VQA step (``train_reference._vqa_step``:
model loss, accuracy syncs, the CLS head through the tower hook), bf16 autocast on CUDA. Times are medians over
``--steps`` steps after two warm-up steps, with min and max; CUDA is synchronised around each part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from vtprune.eval.jobs import fanout

FAMILIES = ("llava", "qwen2_5_vl", "internvl")


def _stats(values: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(values), 2), "min_ms": round(1000 * min(values), 2),
            "max_ms": round(1000 * max(values), 2)}


def probe(family: str, batches: tuple[int, ...], steps: int, profile: bool = False) -> dict:
    """Step times of one family at each batch size; with ``profile``, torch.profiler's table of one more step at the
    first batch size (the ops that take the time, and how many kernels a step launches)."""
    import torch
    import transformers
    from torch import nn

    from vtprune.eval import reference
    from vtprune.eval.train_reference import DenseHeads, GlobalHead, RecipeConfig, _vqa_step

    torch.set_num_threads(4)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    spec = reference.get_family(family, 2)
    model = getattr(transformers, spec.model_class)._from_config(reference.build_config(spec), dtype=torch.float32)
    model.to(device).train()
    qwen = family == "qwen2_5_vl"
    width = model.config.vision_config.out_hidden_size if qwen else model.config.vision_config.hidden_size
    heads = nn.ModuleDict({"dense": DenseHeads(spec.task, width, sub=4 if qwen else 1)})
    if not qwen:
        heads["global"] = GlobalHead(spec.task, width)
    heads.to(device)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(heads.parameters()), lr=1e-4, fused=cuda)
    config = RecipeConfig(family=family)
    stream = spec.task.train_stream(spec.categories, seed=0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    out: dict = {"family": family, "device": torch.cuda.get_device_name() if cuda else "cpu", "batches": {}}
    for batch in batches:
        encode_s, step_s = [], []
        for i in range(steps + 2):
            items = [next(stream) for _ in range(batch)]
            sync()
            t0 = time.perf_counter()
            inputs = reference.encode(spec, items, device, with_answers=True)
            sync()
            t1 = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = _vqa_step(config, spec, model, heads, items, device)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t2 = time.perf_counter()
            del inputs
            if i >= 2:
                encode_s.append(t1 - t0)
                step_s.append(t2 - t1)
        total = [a + b for a, b in zip(encode_s, step_s, strict=True)]
        out["batches"][str(batch)] = {"encode": _stats(encode_s), "step": _stats(step_s), "total": _stats(total),
                                      "items_per_s": round(batch / statistics.median(total), 1)}
        print(family, batch, out["batches"][str(batch)], flush=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        items = [next(stream) for _ in range(batches[0])]
        with torch_profile(activities=activities) as prof:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                loss, _ = _vqa_step(config, spec, model, heads, items, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
        events = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        out["profile"] = {"batch": batches[0], "ops": sum(e.count for e in events if e.key.startswith("aten::")),
                          "table": events.table(sort_by=key, row_limit=25)}
        print(out["profile"]["table"], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--modes", default="alone,shared", help="alone: one family at a time; shared: all at once")
    parser.add_argument("--profile", action="store_true", help="also profile one step per family (alone only)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}.")
    batches = tuple(int(b) for b in args.batches.split(","))
    if any(b < 1 for b in batches) or args.steps < 1:
        parser.error("--batches and --steps must be positive.")
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"alone", "shared"}:
        parser.error("--modes takes alone and/or shared.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps}
    failed = []

    def kept(outcomes: list[fanout.Outcome]) -> dict:
        failed.extend(o.name for o in outcomes if not o.ok)
        return {o.name: o.value if o.ok else {"family": o.name, "error": o.error or o.status} for o in outcomes}

    # A fresh worker per family and mode: a finished worker's cached GPU memory must not starve the next ones.
    if "alone" in modes:
        result["alone"] = {}
        for family in families:
            task = fanout.Task(family, probe, dict(family=family, batches=batches, steps=args.steps,
                                                   profile=args.profile))
            result["alone"].update(kept(fanout.run([task], jobs=1)))
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # what finished survives a cut call
    if "shared" in modes:
        tasks = [fanout.Task(f, probe, dict(family=f, batches=batches, steps=args.steps)) for f in families]
        result["shared"] = kept(fanout.run(tasks, jobs=len(tasks)))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        print(f"failed: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
