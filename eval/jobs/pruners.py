"""Accuracy of every registered method on the reference checkpoints, per keep and budget (one GPU call).

    python -m vtprune.eval.jobs.pruners --limit 200 --out "$OUT"              # every family and method, on a GPU
    python -m vtprune.eval.jobs.pruners --families llava --limit 2 --methods adsc --keeps 0.11 --out /tmp/p  # smoke

Every (family, method, keep) runs in its own worker process (``fanout``: the tiny models leave most of a GPU idle;
the host-side work per batch is the bottleneck), ``--jobs`` at once, each appending its output to
``pruners_<family>.log``, and evaluates the test split: unpruned, then each method at keep 0.11 / 0.22 / 0.33
under ``budget="input"`` and ``budget="average"``. A method whose plan is the same under both budgets (one drop
before the LLM, or ToDRE whose in-LLM stage is outside the budget) runs once and is reported under both. Writes
``pruners.json`` (render it with ``python -m vtprune.eval.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from vtprune.config import BUDGETS
from vtprune.eval.jobs import fanout
from vtprune.eval.methods import parse_spec, plans_differ

KEEPS = (0.11, 0.22, 0.33)
FAMILIES = ("llava", "qwen2_5_vl", "internvl")


def evaluate_family(family: str, checkpoint: Path, methods: list[str], keeps: tuple[float, ...],
                    limit: int | None, split: str = "test") -> dict:
    import torch
    import transformers

    import vtprune
    from vtprune.eval import accuracy, reference

    spec = reference.spec_for(transformers.AutoConfig.from_pretrained(checkpoint))  # v1 or v2, from the checkpoint
    model_cls = getattr(transformers, spec.model_class)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_cls.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    num_layers = model.config.text_config.num_hidden_layers
    categories = list(spec.categories)
    results: dict = {}

    def run(name: str, method_spec: str | None = None, **options) -> None:
        started = time.time()
        try:
            if method_spec is not None:
                method, extra = parse_spec(method_spec)
                vtprune.wrap(model, method, **options, **extra)
            results[name] = accuracy.evaluate(model, spec, categories, split=split, limit=limit, batch_size=64,
                                              progress=False)
        except Exception:  # one failing configuration must not lose the others of a paid GPU call
            results[name] = {"error": traceback.format_exc(limit=4)}
        finally:
            if vtprune.is_wrapped(model):
                vtprune.unwrap(model)
        results[name + ".seconds"] = round(time.time() - started, 1)
        summary = {c: round(v["accuracy"], 3) for c, v in results[name].items() if isinstance(v, dict)}
        print(family, name, summary or results[name], flush=True)

    for method in methods:
        if method == "unpruned":
            run("unpruned")
            continue
        for keep in keeps:
            if plans_differ(method, keep, num_layers):
                for budget in BUDGETS:
                    run(f"{method}@{keep}/{budget}", method, keep=keep, budget=budget)
            else:
                run(f"{method}@{keep}", method, keep=keep)
                results[f"{method}@{keep}/input"] = results[f"{method}@{keep}/average"] = f"{method}@{keep}"
    return results


def evaluate_task(family: str, checkpoint: Path, methods: list[str], keeps: tuple[float, ...], limit: int | None,
                  split: str = "test") -> dict:
    """One worker: ``evaluate_family`` with the few threads a worker gets."""
    import torch

    # Many of these processes share the host: a few threads each keep them from fighting over the cores.
    torch.set_num_threads(2)
    return evaluate_family(family, checkpoint, methods, keeps, limit, split)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--methods", default=None,
                        help="';'-separated method specs, e.g. 'apet;apet[merge=false,inject=false]' (default: every "
                             "registered method)")
    parser.add_argument("--limit", type=int, help="items per category (default: the whole split)")
    parser.add_argument("--split", default="test",
                        help="test, or test_shift (yardstick v2); writes pruners.json, or pruners_<split>.json")
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds after which unfinished workers are stopped and the finished ones merged")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4, help="worker processes at once")
    args = parser.parse_args(argv)

    import vtprune

    methods = args.methods.split(";") if args.methods else vtprune.list_methods()
    keeps = tuple(float(k) for k in args.keeps.split(","))
    unknown = sorted({parse_spec(m)[0] for m in methods} - set(vtprune.list_methods()) - {"unpruned"})
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {vtprune.list_methods()}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1.")

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    checkpoints = args.checkpoints.resolve()
    families = args.families.split(",")
    # One worker per (family, method, keep): the evaluation is bound by host-side work per batch, not by the GPU;
    # at most --jobs at once, each one a whole Python process with its own CUDA context.
    runs = [(family, "unpruned", keeps[0]) for family in families]
    runs += [(family, method, keep) for family in families for method in methods if method != "unpruned"
             for keep in keeps]
    # Longest first: the Qwen workers (nine categories, a slower vision tower) bound the wall time.
    runs.sort(key=lambda run: run[0] != "qwen2_5_vl")
    tasks = [fanout.Task(f"{family}/{method}@{keep}", evaluate_task,
                         dict(family=family, checkpoint=checkpoints / family, methods=[method], keeps=(keep,),
                              limit=args.limit, split=args.split),
                         log=args.out / f"pruners_{family}.log")
             for family, method, keep in runs]
    # Past the deadline the workers still running are stopped; what the others finished is kept.
    outcomes = fanout.run(tasks, jobs=args.jobs, deadline=args.deadline)
    # A worker's traceback went to its family's log; the status keeps its exit code, as a process's would read.
    status = {o.name: 0 if o.ok else o.exitcode if o.status == fanout.FAILED else o.status for o in outcomes}
    import torch

    merged = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m vtprune.eval.jobs.pruners " + " ".join(argv if argv is not None else sys.argv[1:]),
        "split": args.split,
        "note": f"{args.split} split, first {args.limit or 'all'} items per category, fp32; keep per image",
        "seconds": round(time.time() - started, 1),
        "status": status,
        "families": {},
    }
    for (family, _, _), outcome in zip(runs, outcomes, strict=True):
        if outcome.ok:
            entry = merged["families"].setdefault(family, {"family": family, "accuracy": {}})
            entry["accuracy"].update(outcome.value)
    name = "pruners.json" if args.split == "test" else f"pruners_{args.split}.json"
    (args.out / name).write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(status))
    return 0 if all(code == 0 for code in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
