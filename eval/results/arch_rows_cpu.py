"""LLaVA v1 reference rows on a CPU slice (eval/results/arch_rows_cpu.json): unpruned and every method at keep 0.22
under both budgets, per category, first 40 items. Run it before and after a refactor and compare the two files:

    python eval/results/arch_rows_cpu.py OUT.json
"""

import json
import sys
import time

import torch
import transformers

import vtprune
from vtprune.eval import accuracy, reference

torch.manual_seed(0)
spec = reference.get_family("llava")
model = transformers.LlavaForConditionalGeneration.from_pretrained("checkpoints/llava", dtype=torch.float32).eval()
categories = list(spec.task.IMAGE_CATEGORIES)
out = {}
started = time.time()
out["unpruned"] = accuracy.evaluate(model, spec, categories, limit=40, batch_size=40, progress=False)
for method in ("random", "uniform", "todre", "apet", "adsc"):
    for budget in ("input", "average"):
        try:
            vtprune.wrap(model, method, keep=0.22, budget=budget)
            out[f"{method}@0.22/{budget}"] = accuracy.evaluate(model, spec, categories, limit=40, batch_size=40,
                                                               progress=False)
        except ValueError as error:
            out[f"{method}@0.22/{budget}"] = {"error": str(error)}
        finally:
            if vtprune.is_wrapped(model):
                vtprune.unwrap(model)
with open(sys.argv[1], "w") as handle:
    json.dump(out, handle, indent=1, default=str)
print(round(time.time() - started), "s")
