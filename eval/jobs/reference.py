"""Train the yardstick-v2 reference checkpoints of every family on one GPU, then measure their table and gates.

    python -m vtprune.eval.jobs.reference --minutes 7 --plan-minutes 15 --eval none --out "$OUT"          # part 1
    python -m vtprune.eval.jobs.reference --minutes 8 --plan-minutes 15 --resume parts --eval none --out "$OUT"
    python -m vtprune.eval.jobs.reference --minutes 0 --resume checkpoints/v2 --limit 1000 --out "$OUT"  # eval only

The families train side by side in worker processes (``fanout``: tiny models leave most of one GPU idle), each saving
its checkpoint (weights, heads and ``train_state.json``, so a later call resumes it); then each evaluates on ``test``
and ``test_shift``: unpruned, blind (every visual token masked), the object oracle and the question-aware oracle at
keep 0.11, the CLS-attention top-k (towers with a CLS), and ``random`` / ``uniform`` at keep 0.11 / 0.22 / 0.33, plus
the share of the top-11% CLS-attention tokens on objects; ``accuracy.gates`` turns that into the gates.
Checkpoints come back as one ``<family>.tar.gz`` per family (the device tool returns at most 8 files).
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from vtprune.eval.jobs import fanout

KEEPS = (0.11, 0.22, 0.33)
SPLITS = ("test", "test_shift")
FAMILIES = ("llava", "qwen2_5_vl", "internvl")


def evaluate_family(family: str, checkpoint: Path, limit: int | None, splits: tuple[str, ...] = SPLITS,
                    keeps: tuple[float, ...] = KEEPS, batch_size: int = 64,
                    categories: tuple[str, ...] | None = None, deadline: float = float("inf")) -> dict:
    """Every yardstick row of one checkpoint on each split, the CLS share and the gates (on ``test``; a gate whose
    categories were left out by ``categories`` reads "not measured")."""
    import torch
    import transformers

    from vtprune.eval import accuracy, reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    spec = reference.spec_for(config)
    model = getattr(transformers, spec.model_class).from_pretrained(checkpoint, dtype=torch.float32)
    model = model.to(device).eval()
    out: dict = {"version": spec.version}
    for split in splits:
        out[split] = measure_split(model, spec, split, limit, keeps, batch_size, categories, deadline)
    if "test" in out and spec.name in ("llava", "internvl") and time.time() < deadline:
        image = [c for c in spec.task.IMAGE_CATEGORIES if categories is None or c in categories]
        items = [it for c in image for it in spec.task.split_items("test", c, limit or 200)]
        out["cls_share"] = accuracy.cls_on_objects(model, spec, items)
    if "test" in out:
        out["gates"] = [{**asdict(g), "passed": g.passed}
                        for g in accuracy.gates(spec, out["test"], out.get("cls_share"))]
    return out


def measure_split(model, spec, split: str, limit: int | None, keeps: tuple[float, ...], batch_size: int,
                  categories: tuple[str, ...] | None = None, deadline: float = float("inf")) -> dict:
    """The yardstick rows of one split: unpruned, blind, both oracles, CLS top-k, random and uniform. A row that
    would start after ``deadline`` (a ``time.time()`` value) is recorded as not run, so a bounded GPU call still
    returns the rows it finished."""
    import vtprune
    from vtprune.eval import accuracy

    categories = list(categories or spec.categories)
    runs: dict = {}

    def run(name: str, install=None, **kwargs) -> None:
        started = time.time()
        if started >= deadline:
            runs[name] = {"error": "not run: the call's deadline was reached"}
            return
        handle = None
        try:
            handle = install() if install is not None else None
            runs[name] = accuracy.evaluate(model, spec, categories, split=split, limit=limit, batch_size=batch_size,
                                           progress=False, **kwargs)
        except Exception:  # one failing row must not lose the others of a paid GPU call
            runs[name] = {"error": traceback.format_exc(limit=4)}
        finally:
            if handle is not None:
                handle.remove()
            if vtprune.is_wrapped(model):
                vtprune.unwrap(model)
        runs[name + ".seconds"] = round(time.time() - started, 1)
        print(spec.name, split, name, {c: round(v["accuracy"], 3) for c, v in runs[name].items()
                                       if isinstance(v, dict)}, flush=True)

    run("unpruned")
    run("blind", blind=True)
    for aware in (False, True):
        oracle: list = []

        def install_oracle(aware=aware, oracle=oracle):
            adapter, pruner = accuracy.install_oracle(model, spec, 0.11, question_aware=aware)
            oracle.append(pruner)
            return adapter

        run("oracle-q@0.11" if aware else "oracle@0.11", install_oracle,
            before=lambda items, oracle=oracle: oracle[0].prepare(items))
    if spec.name in ("llava", "internvl"):
        run("cls@0.11", lambda: accuracy.install_eval_pruner(
            model, accuracy.ClsTop(accuracy.ClsTopConfig(keep=0.11)))[0])
    for method in ("random", "uniform"):
        for keep in keeps:
            run(f"{method}@{keep}", lambda method=method, keep=keep: _Wrapped(model, method, keep))
    return runs


class _Wrapped:
    """``vtprune.wrap`` for one row, with the ``remove()`` the row runner calls."""

    def __init__(self, model, method: str, keep: float) -> None:
        import vtprune

        self.model = vtprune.wrap(model, method, keep=keep)

    def remove(self) -> None:
        import vtprune

        vtprune.unwrap(self.model)


def run_family(family: str, minutes: float, plan_minutes: float | None, work: Path, resume: Path | None,
               evaluate: bool, limit: int | None, deadline: float = float("inf"), recipe: dict | None = None) -> dict:
    """One worker: train (or continue) one family for ``minutes``, then evaluate it unless told not to; ``recipe``
    overrides ``RecipeConfig`` fields (a value of None keeps the recipe's default)."""
    import torch

    from vtprune.eval.train_reference import RecipeConfig, train

    torch.set_num_threads(4)  # the workers share the host's cores
    checkpoint = work / family
    start = resume / family if resume is not None else None
    result: dict = {"family": family}
    try:
        if minutes > 0:
            chosen = {k: v for k, v in (recipe or {}).items() if v is not None}
            notes = train(RecipeConfig(family=family, minutes=minutes, plan_minutes=plan_minutes, **chosen),
                          checkpoint, start)
        else:  # evaluation only, of the checkpoint given by --resume
            checkpoint = start
            notes = json.loads((checkpoint / "training.json").read_text())
        result["training"] = {k: v for k, v in notes.items() if k != "log"}
        result["log"] = notes.get("log", [])
        if evaluate:
            result["accuracy"] = evaluate_family(family, checkpoint, limit, deadline=deadline)
    except Exception:
        result["error"] = traceback.format_exc(limit=6)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=7.0, help="training minutes; 0 evaluates --resume only")
    parser.add_argument("--plan-minutes", type=float, help="the whole run's training minutes over all parts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--limit", type=int, default=1000, help="items per category of each split")
    parser.add_argument("--eval", choices=("all", "none"), default="all")
    parser.add_argument("--resume", type=Path, help="folder with one checkpoint per family to continue or evaluate")
    parser.add_argument("--batch", type=int, help="items per VQA batch (default: the recipe's RecipeConfig)")
    parser.add_argument("--batch-dense", type=int, help="images per dense pre-training batch (default: the recipe's)")
    parser.add_argument("--dense-fraction", type=float,
                        help="longest share of the plan in dense pre-training (default: the recipe's)")
    parser.add_argument("--drop-keep", type=float,
                        help="keep fraction at the start of the VQA token-drop curriculum (default: the recipe's)")
    parser.add_argument("--token-dropout", type=float,
                        help="share of VQA images shown as a random subset of their tokens (default: the recipe's)")
    parser.add_argument("--dropout-enriched", type=float,
                        help="share of dropped-out images that keep all their object tokens (default: the recipe's)")
    parser.add_argument("--caption-share", type=float, help="share of caption items in VQA (default: the recipe's)")
    parser.add_argument("--local-attention-gain", type=float,
                        help="locality prior of a fresh CLIP / InternViT tower (default: the recipe's)")
    parser.add_argument("--vision-lr-scale", type=float,
                        help="the tower's learning rate relative to the LLM's (default: the recipe's)")
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds from the start after which no new evaluation row starts (rows left are marked)")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {list(FAMILIES)}.")
    if any(b is not None and b < 1 for b in (args.batch, args.batch_dense)):
        parser.error("--batch and --batch-dense must be at least 1.")
    if args.dense_fraction is not None and not 0 <= args.dense_fraction <= 1:
        parser.error(f"--dense-fraction must be in [0, 1], got {args.dense_fraction}.")
    if args.minutes == 0 and args.resume is None:
        parser.error("--minutes 0 evaluates existing checkpoints: give them with --resume DIR.")

    deadline = time.time() + args.deadline
    work = Path("/tmp/vtprune-reference")
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    resume = args.resume.resolve() if args.resume else None
    # One worker per family, all at once; --deadline is kept inside each worker (no new row after it), so a worker
    # is never killed mid-row.
    tasks = [fanout.Task(family, run_family,
                         dict(family=family, minutes=args.minutes, plan_minutes=args.plan_minutes, work=work,
                              resume=resume, evaluate=args.eval == "all", limit=args.limit, deadline=deadline,
                              recipe={"batch": args.batch, "batch_dense": args.batch_dense,
                                      "dense_fraction": args.dense_fraction, "drop_keep": args.drop_keep,
                                      "token_dropout": args.token_dropout,
                                      "dropout_enriched": args.dropout_enriched,
                                      "caption_share": args.caption_share,
                                      "local_attention_gain": args.local_attention_gain,
                                      "vision_lr_scale": args.vision_lr_scale}))
             for family in families]
    outcomes = fanout.run(tasks, jobs=len(tasks))
    merged = {"families": {o.name: o.value if o.ok else {"family": o.name, "error": o.error} for o in outcomes}}
    for family in families:
        checkpoint = work / family
        if checkpoint.exists() and args.minutes > 0:
            with tarfile.open(args.out / f"{family}.tar.gz", "w:gz") as tar:  # one file back of at most 16 MiB
                tar.add(checkpoint, arcname=family)
    (args.out / "reference.json").write_text(json.dumps(merged, indent=2) + "\n")
    failed = [f for f, r in merged["families"].items() if "error" in r]
    print(json.dumps({"failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
