"""The code in docs/ runs as written: the example method of docs/adding_a_method.md registers, prunes a model and
keeps what it says it keeps."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune import registry

from .conftest import FACTORIES, Prompt

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding_a_method.md"


def _run_doc_code(monkeypatch, doc: Path, table: str, module_name: str) -> dict:
    """Execute the one python block of ``doc`` in a private copy of the registry table ``table`` (PRUNERS or
    ADAPTERS), so the registry-driven matrix never sees what it registers."""
    registry._load_builtins()
    monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    (code,) = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    module = types.ModuleType(module_name)
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(code, str(doc), "exec"), module.__dict__)
    return module.__dict__


@pytest.fixture
def example_method(monkeypatch):
    """The method doc's example, registered privately."""
    return _run_doc_code(monkeypatch, DOC, "PRUNERS", "docs_example")


def test_the_example_method_keeps_the_largest_norm_tokens(example_method) -> None:
    assert "largest-norm" in vtprune.list_methods()
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2)], seed=3)
    captured = []
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.append(out))
    vtprune.wrap(model, "largest-norm", keep=0.25)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    kept = model.vtprune.engine.last_stats.stages[0].kept
    features = captured[0].reshape(3, -1, captured[0].shape[-1]).float()
    budget = round(0.25 * features.shape[1])
    for image, indices in enumerate(kept):
        expected = features[image].norm(dim=-1).topk(budget).indices
        assert torch.equal(indices.sort().values, expected.sort().values)
    vtprune.unwrap(model)
    vtprune.wrap(model, "largest-norm", keep=0.25, where="llm:2")
    with torch.no_grad():
        model(**inputs)
    assert model.vtprune.last_stats["samples"][1]["tokens_per_layer"][2] == 2 * budget


@pytest.mark.parametrize("where", ["encoder", "decode:2"])
def test_wrap_refuses_a_point_the_example_does_not_list(example_method, where) -> None:
    model = FACTORIES["llava"].build("sdpa")
    with pytest.raises(ValueError, match=r"Method 'largest-norm' does not act at '" + where + "'.*projector, llm:K"):
        vtprune.wrap(model, "largest-norm", keep=0.5, where=where)
    assert not vtprune.is_wrapped(model)


MODEL_DOC = DOC.parent / "adding_a_model.md"


@pytest.fixture
def example_family(monkeypatch):
    """The model doc's family file, registered privately."""
    return _run_doc_code(monkeypatch, MODEL_DOC, "ADAPTERS", "docs_family")


@pytest.mark.parametrize("where", ["projector", "llm:2"])
def test_the_example_family_prunes_as_the_builtin_llava(example_family, where) -> None:
    assert "toy_llava" in vtprune.list_models()
    factory = FACTORIES["llava"]
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2)], seed=5)
    runs = []
    for model_type in ("llava", "toy_llava"):
        model.config.model_type = model_type  # the registry picks the family by it
        vtprune.wrap(model, "random", keep=0.25, where=where, seed=1)
        assert type(model.vtprune.engine.family).__name__ == ("ToyLlava" if model_type == "toy_llava"
                                                               else "LlavaAdapter")
        with torch.no_grad():
            logits = model(**inputs).logits
        stats = model.vtprune.engine.last_stats
        runs.append((logits, [kept.tolist() for stage in stats.stages for kept in stage.kept],
                     stats.tokens_per_layer.tolist()))
        vtprune.unwrap(model)
    (a, *facts_a), (b, *facts_b) = runs
    torch.testing.assert_close(a, b)
    assert facts_a == facts_b
