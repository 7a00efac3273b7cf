"""The engine's own contract, for every family: insertion points (one ``Point`` type, ``Pruner.points`` enforced),
the sizing it owns (keep=1 is the identity without calling the method), the checks of a method's ``Selection``,
what a call leaves behind (no KV cache, features or probe inputs after it), the inner language model called on its
own after a wrapped ``generate``, and ``copy.deepcopy`` of a wrapped model.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import weakref

import pytest
import torch
from conftest import FACTORIES, Prompt

import vtprune
from vtprune import registry
from vtprune.config import WhereConfig
from vtprune.point import PATTERNS, Point
from vtprune.pruners.base import Pruner
from vtprune.state import Selection

LLAVA = FACTORIES["llava"]


# ----------------------------------------------------------------------------------------------------- Point
@pytest.mark.parametrize("text", ["encoder", "projector", "llm:0", "llm:2", "decode:3"])
def test_point_round_trips_through_its_string(text):
    point = Point.parse(text)
    assert str(point) == text
    assert Point.parse(point) is point
    assert point == Point(point.kind, point.layer)
    assert point.pattern in PATTERNS


@pytest.mark.parametrize("text", ["middle", "llm", "llm:-1", "llm:x", "decode:", "Projector", 3])
def test_point_refuses_what_is_not_a_point(text):
    with pytest.raises(ValueError, match="Invalid insertion point"):
        Point.parse(text)


def test_point_depth_is_checked_in_one_place_with_the_layer_count():
    assert Point.parse("llm:3").check_depth(4) == Point("llm", 3)
    with pytest.raises(ValueError, match=r"'llm:4' names decoder layer 4, but the model has 4 decoder layers"):
        Point.parse("llm:4").check_depth(4)


def test_comparing_a_point_with_a_string_raises_instead_of_being_false():
    with pytest.raises(TypeError, match="point.kind"):
        _ = Point.parse("llm:2") == "llm"


def test_where_config_saves_the_string_and_parses_it_once(tmp_path):
    config = vtprune.registry.get_pruner_class("uniform").config_cls(keep=0.5, where="llm:2")
    assert config.point == Point("llm", 2)
    path = tmp_path / "cfg.json"
    config.save(path)
    assert '"where": "llm:2"' in path.read_text()
    assert vtprune.PrunerConfig.load(path) == config


# ------------------------------------------------------------------------------------ a private test method
@pytest.fixture
def private_registry(monkeypatch):
    registry._load_builtins()
    monkeypatch.setattr(registry, "PRUNERS", dict(registry.PRUNERS))


def _method(name: str, points: tuple[str, ...], select) -> type:
    """Register, in the private registry, a where= method called ``name`` with the given points and select."""
    config_cls = dataclasses.make_dataclass(
        f"Config_{name.replace('-', '_')}", [], bases=(WhereConfig,), frozen=True, namespace={"method": name}
    )
    pruner = type(f"Pruner_{name.replace('-', '_')}", (Pruner,), {
        "config_cls": config_cls, "points": points, "select": lambda self, ctx: select(ctx),
    })
    return registry.register_pruner(pruner)


def _first(ctx) -> Selection:
    return Selection(keep=[torch.arange(image.budget) for image in ctx.images])


def test_the_registry_name_is_the_config_method(private_registry):
    for name in vtprune.list_methods():
        cls = registry.get_pruner_class(name)
        assert cls.name == cls.config_cls.method == name
    cls = _method("first-tokens", ("projector",), _first)
    assert "first-tokens" in vtprune.list_methods() and cls.name == "first-tokens"
    with pytest.raises(TypeError, match="no arguments"):
        registry.register_pruner("first-tokens")


def test_register_refuses_points_outside_the_vocabulary(private_registry):
    with pytest.raises(ValueError, match=r"points=\('llm',\) must be"):
        _method("bad-points", ("llm",), _first)


def test_wrap_enforces_the_method_points(private_registry):
    _method("projector-only", ("projector",), _first)
    model = LLAVA.build("sdpa")
    for where in ("encoder", "llm:2", "decode:2"):
        with pytest.raises(ValueError, match=rf"Method 'projector-only' does not act at '{where}'; its insertion "
                                             r"points are projector\."):
            vtprune.wrap(model, "projector-only", keep=0.5, where=where)
        assert not vtprune.is_wrapped(model)
    vtprune.wrap(model, "projector-only", keep=0.5)


def test_the_cli_shows_the_points_wrap_enforces(private_registry, capsys):
    from vtprune.cli import main

    _method("projector-only", ("projector",), _first)
    main(["methods"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("projector-only"))
    assert "projector" in row and "llm:K" not in row


# ------------------------------------------------------------------------------------------ sizing and keep=1
def test_keep_one_never_calls_the_method(private_registry):
    def refuse(ctx):
        raise AssertionError("select was called at a stage that drops nothing")

    _method("never-called", ("projector", "llm:K"), refuse)
    for where in ("projector", "llm:2"):
        model = LLAVA.build("sdpa")
        inputs = LLAVA.inputs(model, [Prompt(images=1), Prompt(images=2)])
        with torch.no_grad():
            expected = model(**inputs).logits
            vtprune.wrap(model, "never-called", keep=1.0, where=where)
            torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=0)
        assert model.vtprune.last_stats["samples"][1]["tokens_per_layer"] == [2 * LLAVA.tokens_per_image(model)] * 4


# ---------------------------------------------------------------------------------------- Selection checks
def _bad_duplicate(ctx) -> Selection:
    return Selection(keep=[torch.zeros(image.budget, dtype=torch.long) for image in ctx.images])


def _bad_range(ctx) -> Selection:
    return Selection(keep=[torch.arange(image.budget) + image.num_tokens for image in ctx.images])


def _bad_count(ctx) -> Selection:
    return Selection(keep=[torch.arange(image.budget + 1) for image in ctx.images])


def _bad_dtype(ctx) -> Selection:
    return Selection(keep=[torch.arange(image.budget).float() for image in ctx.images])


def _bad_length(ctx) -> Selection:
    return Selection(keep=[torch.arange(ctx.images[0].budget)])


@pytest.mark.parametrize("where", ["projector", "llm:2"])
@pytest.mark.parametrize(("select", "message"), [
    (_bad_duplicate, "the same index twice for image 0"),
    (_bad_range, "indices outside its present tokens for image 0"),
    (_bad_count, r"kept \d+ tokens of image 0; the stage's budget is \d+"),
    (_bad_dtype, "1-D integer tensor"),
    (_bad_length, r"returned 1 keep lists for \d+ images"),
], ids=["duplicate", "range", "count", "dtype", "length"])
def test_a_bad_selection_is_refused_naming_the_method(private_registry, factory, select, message, where):
    _method("bad-select", ("projector", "llm:K"), select)
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2)])
    vtprune.wrap(model, "bad-select", keep=0.25, where=where)
    with pytest.raises(ValueError, match=rf"Method 'bad-select' at '{where}'.*{message}"), torch.no_grad():
        model(**inputs)
    assert model.vtprune.engine.state is None or not model.vtprune.engine.state.checks
    # The model stays usable: the next call with a correct method is fine.
    vtprune.unwrap(model)
    vtprune.wrap(model, "uniform", keep=0.25, where=where)
    with torch.no_grad():
        model(**inputs)


# ------------------------------------------------------------------------------------ what a call leaves behind
def _tensors_held(adapter) -> list[str]:
    """The per-call state the adapter holds beyond last_stats: captured records, probe inputs, the call state."""
    held = [f"captured[{key}]" for key, records in adapter.captured.items() if records]
    if adapter.state is not None:
        held += ["state"] + [f"probe_inputs[{k}]" for k in adapter.state.probe_inputs]
    return held


@pytest.mark.parametrize("method", ["todre", "uniform"])
def test_generate_releases_the_call_state_and_the_kv_cache(factory, method):
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2)], seed=5)
    options = {} if method == "todre" else {"where": "llm:2"}
    vtprune.wrap(model, method, keep=0.25, **options)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = weakref.ref(out.past_key_values)
    assert _tensors_held(model.vtprune.engine) == []
    del out
    gc.collect()
    assert cache() is None, "the wrapped model still holds the last call's KV cache"
    assert model.vtprune.last_stats is not None


def test_a_plain_forward_keeps_no_cache_features_or_probe_inputs(factory):
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2)], seed=5)
    vtprune.wrap(model, "todre", keep=0.25)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = weakref.ref(out.past_key_values)
    assert _tensors_held(model.vtprune.engine) in ([], ["state"])
    del out
    gc.collect()
    assert cache() is None


def test_the_inner_language_model_runs_plain_after_a_wrapped_generate(factory):
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2)], seed=6)
    embeds = torch.randn(2, 7, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        vtprune.wrap(model, "uniform", keep=0.25, where="llm:2")
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
        got = model.model.language_model(inputs_embeds=embeds).last_hidden_state
        # and after a plain pruned forward, whose state stays for a hand-written decode loop
        model(**inputs)
        again = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ deepcopy
def test_deepcopy_of_a_wrapped_model_raises_and_the_documented_route_works():
    model = LLAVA.build("sdpa")
    inputs = LLAVA.inputs(model, [Prompt(images=1)])
    vtprune.wrap(model, "uniform", keep=0.25)
    with pytest.raises(TypeError, match="deepcopy of a vtprune-wrapped model is not supported.*vtprune.unwrap"):
        copy.deepcopy(model)
    with torch.no_grad():
        expected = model(**inputs).logits
        config = model.vtprune.config
        vtprune.unwrap(model)
        twin = copy.deepcopy(model)
        vtprune.wrap(model, config)
        vtprune.wrap(twin, config)
        torch.testing.assert_close(twin(**inputs).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(model(**inputs).logits, expected, atol=0, rtol=0)
    assert twin.vtprune.engine is not model.vtprune.engine
