"""One GPU call that trains every reference family in parallel, then measures the yardstick table.

    python -m vtprune.eval.reference_job --minutes 6.5 --out "$OUT"

Each family trains in its own process (tiny models leave most of one GPU idle, so three share it), saves its
checkpoint, then evaluates on the full test split: unpruned, blind (every visual token masked), the pixel-saliency
oracle at keep 0.11, and ``random`` / ``uniform`` at keep 0.11 / 0.22 / 0.33 where vtprune has an adapter for the
family. Checkpoints come back as one tar per family (the device tool returns at most 8 files).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

KEEPS = (0.11, 0.22, 0.33)


def evaluate_family(family: str, checkpoint: Path, limit: int | None) -> dict:
    import torch
    import transformers

    import vtprune
    from vtprune.eval import accuracy, reference

    spec = reference.get_family(family)
    model_cls = getattr(transformers, spec.model_class)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_cls.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    categories = list(spec.categories)
    results: dict = {}

    def run(name: str, **kwargs) -> None:
        started = time.time()
        try:
            results[name] = accuracy.evaluate(model, spec, categories, limit=limit, batch_size=64, progress=False,
                                              **kwargs)
        except Exception:  # one failing configuration must not lose the others of a paid GPU call
            results[name] = {"error": traceback.format_exc(limit=4)}
        results[name + ".seconds"] = round(time.time() - started, 1)
        print(family, name, {c: round(v["accuracy"], 3) for c, v in results[name].items() if isinstance(v, dict)},
              flush=True)

    run("unpruned")
    run("blind", blind=True)
    if family in vtprune.list_models():
        try:
            adapter, oracle = accuracy.install_oracle(model, spec, 0.11)
            run("oracle@0.11", before=oracle.prepare)
            adapter.remove()
        except Exception:
            results["oracle@0.11"] = {"error": traceback.format_exc(limit=4)}
        for method in ("random", "uniform"):
            for keep in KEEPS:
                vtprune.wrap(model, method, keep=keep)
                run(f"{method}@{keep}")
                vtprune.unwrap(model)
    else:
        results["note"] = f"no vtprune adapter for {family} yet: pruned rows not measured"
    return results


def child(family: str, minutes: float, work: Path, limit: int | None, resume: Path | None) -> int:
    from vtprune.eval.train_reference import TrainConfig, train

    checkpoint = work / family
    start = resume / family if resume is not None else None
    if minutes > 0:
        notes = train(TrainConfig(family=family, minutes=minutes), checkpoint, start)
    else:  # evaluation only, of the checkpoint given by --resume
        checkpoint = start
        notes = json.loads((checkpoint / "training.json").read_text())
    results = {"family": family, "training": {k: v for k, v in notes.items() if k != "log"}, "log": notes["log"]}
    results["accuracy"] = evaluate_family(family, checkpoint, limit)
    (work / f"{family}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.5, help="training minutes; 0 evaluates --resume only")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--families", default="llava,qwen2_5_vl,internvl")
    parser.add_argument("--limit", type=int, help="items per category (default: the whole test split)")
    parser.add_argument("--resume", type=Path, help="folder with one checkpoint per family to continue training")
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.family:
        return child(args.family, args.minutes, args.work, args.limit, args.resume)

    work = Path("/tmp/vtprune-reference")
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for family in args.families.split(","):
        cmd = [sys.executable, "-m", "vtprune.eval.reference_job", "--family", family, "--minutes",
               str(args.minutes), "--work", str(work), "--out", str(args.out)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        if args.resume:
            cmd += ["--resume", str(args.resume.resolve())]
        log = open(args.out / f"{family}.log", "w")  # noqa: SIM115 - closed after the child ends
        procs[family] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    status = {}
    for family, (proc, log) in procs.items():
        status[family] = proc.wait()
        log.close()
    merged = {"status": status}
    for family in procs:
        result = work / f"{family}.json"
        if result.exists():
            merged[family] = json.loads(result.read_text())
        checkpoint = work / family
        if checkpoint.exists() and args.minutes > 0:
            with tarfile.open(args.out / f"{family}.tar", "w") as tar:
                tar.add(checkpoint, arcname=family)
    (args.out / "reference.json").write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(status))
    return 0 if all(code == 0 for code in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
