"""Accuracy of every registered method on the reference checkpoints, per keep and budget (one GPU call).

    python -m vtprune.eval.pruner_job --limit 200 --out "$OUT"              # every family and method, on a GPU
    python -m vtprune.eval.pruner_job --families llava --limit 2 --methods adsc --keeps 0.11 --out /tmp/p  # smoke

Every (family, method, keep) runs in its own process (the tiny models leave most of a GPU idle; the host-side work
per batch is the bottleneck) and evaluates the test split: unpruned, then each method at keep 0.11 / 0.22 / 0.33
under ``budget="input"`` and ``budget="average"``. A method whose plan is the same under both budgets (one drop
before the LLM, or ToDRE whose in-LLM stage is outside the budget) runs once and is reported under both. Writes
``pruners.json`` (render it with ``python -m vtprune.eval.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

KEEPS = (0.11, 0.22, 0.33)
BUDGETS = ("input", "average")
FAMILIES = ("llava", "qwen2_5_vl", "internvl")


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"apet[merge=false,inject=false]"`` -> ("apet", {"merge": False, "inject": False}): a method with options,
    for ablations."""
    if "[" not in spec:
        return spec, {}
    from vtprune.config import option_value

    name, _, rest = spec.partition("[")
    options = {}
    for item in rest.rstrip("]").split(","):
        key, _, value = item.partition("=")
        options[key.strip()] = option_value(value.strip())
    return name, options


def plans_differ(spec: str, keep: float, num_layers: int) -> bool:
    """Whether ``spec`` drops differently under the two budgets on an LLM of ``num_layers`` layers."""
    from vtprune.budget import size_plan
    from vtprune.registry import get_pruner_class

    method, options = parse_spec(spec)
    cls = get_pruner_class(method)
    plans = []
    for budget in BUDGETS:
        try:
            plans.append(size_plan(cls(cls.config_cls(keep=keep, budget=budget, **options)), num_layers))
        except ValueError:
            return True  # infeasible under one budget: run both so the error is recorded
    return plans[0] != plans[1]


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


def child(family: str, checkpoints: Path, methods: list[str], keeps: tuple[float, ...], limit: int | None,
          work: Path, split: str = "test") -> int:
    import torch

    # Many of these processes share the host: a few threads each keep them from fighting over the cores.
    torch.set_num_threads(2)
    results = evaluate_family(family, checkpoints / family, methods, keeps, limit, split)
    name = "+".join(methods) + "@" + "+".join(map(str, keeps))
    (work / f"{family}__{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


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
                        help="seconds after which unfinished children are stopped and the finished ones merged")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 4, help="child processes at once")
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import vtprune

    methods = args.methods.split(";") if args.methods else vtprune.list_methods()
    keeps = tuple(float(k) for k in args.keeps.split(","))
    unknown = sorted({parse_spec(m)[0] for m in methods} - set(vtprune.list_methods()) - {"unpruned"})
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {vtprune.list_methods()}")
    if args.family:
        return child(args.family, args.checkpoints, methods, keeps, args.limit, args.work, args.split)

    import tempfile

    work = Path(tempfile.mkdtemp(prefix="vtprune-pruners-"))
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    started = time.time()
    # One process per (family, method, keep): the evaluation is bound by host-side work per batch, not by the GPU.
    jobs = [(family, "unpruned", keeps[0]) for family in args.families.split(",")]
    jobs += [(family, method, keep) for family in args.families.split(",") for method in methods for keep in keeps]
    # Longest first: the Qwen children (nine categories, a slower vision tower) bound the wall time.
    jobs.sort(key=lambda job: job[0] != "qwen2_5_vl")
    running: list[subprocess.Popen] = []
    status = {}
    for family, method, keep in jobs:
        # At most --jobs children at once: each one is a whole Python process with its own CUDA context.
        while len(running) >= args.jobs and time.time() < started + args.deadline:
            time.sleep(0.2)
            running = [proc for proc in running if proc.poll() is None]
        if time.time() >= started + args.deadline:
            break
        cmd = [sys.executable, "-m", "vtprune.eval.pruner_job", "--family", family, "--work", str(work),
               "--out", str(args.out), "--checkpoints", str(args.checkpoints.resolve()), "--methods", method,
               "--keeps", str(keep), "--split", args.split]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        with open(args.out / f"pruners_{family}.log", "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        procs[(family, method, keep)] = proc
        running.append(proc)
    for (family, method, keep), proc in procs.items():
        try:
            status[f"{family}/{method}@{keep}"] = proc.wait(timeout=max(1.0, started + args.deadline - time.time()))
        except subprocess.TimeoutExpired:
            # Past the deadline: stop the child, keep what the others finished.
            proc.kill()
            status[f"{family}/{method}@{keep}"] = "killed at the deadline"
    import torch

    merged = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m vtprune.eval.pruner_job " + " ".join(argv if argv is not None else sys.argv[1:]),
        "split": args.split,
        "note": f"{args.split} split, first {args.limit or 'all'} items per category, fp32; keep per image",
        "seconds": round(time.time() - started, 1),
        "status": status,
        "families": {},
    }
    for family, method, keep in procs:
        result = work / f"{family}__{method}@{keep}.json"
        if result.exists():
            entry = merged["families"].setdefault(family, {"family": family, "accuracy": {}})
            entry["accuracy"].update(json.loads(result.read_text()))
    name = "pruners.json" if args.split == "test" else f"pruners_{args.split}.json"
    (args.out / name).write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(status))
    return 0 if all(code == 0 for code in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
