"""The user's surface: ``wrap`` / ``unwrap`` / ``is_wrapped``, the config forms ``wrap`` accepts, the registry's
errors, bad input (each error must name the problem and leave the model untouched), and the behaviours a user
relies on around a pruned model (text-only prompts, labels, ``last_stats``, sampling, the kernel switch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from conftest import FACTORIES, Prompt
from torch import nn

import vtprune
from vtprune.budget import kept_count
from vtprune.config import CONFIG_VERSION, PrunerConfig
from vtprune.pruners.base import Pruner
from vtprune.pruners.random import RandomConfig
from vtprune.pruners.uniform import UniformConfig
from vtprune.registry import ADAPTERS, PRUNERS, register_adapter, register_pruner

LLAVA = FACTORIES["llava"]

# Every per-module hook dict of nn.Module; the *_with_kwargs / always_called dicts are keyed by the same hook ids.
HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)
GLOBAL_HOOK_DICTS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_with_kwargs")


def _num_layers(model) -> int:
    return model.config.text_config.num_hidden_layers


def _hooks(model: nn.Module) -> dict[tuple[str, str], list[int]]:
    """Ids of every hook on every module, keyed by (module name, hook dict); empty dicts left out."""
    return {
        (name, attr): sorted(getattr(module, attr))
        for name, module in model.named_modules()
        for attr in HOOK_DICTS
        if getattr(module, attr)
    }


def _vtprune_hooks(model: nn.Module) -> list[str]:
    """Hooks (per module or global) whose function comes from vtprune's code."""
    found = []
    tables = [(name, attr, getattr(m, attr)) for name, m in model.named_modules() for attr in HOOK_DICTS[::2]]
    tables += [("<global>", attr, getattr(torch.nn.modules.module, attr)) for attr in GLOBAL_HOOK_DICTS]
    for name, attr, table in tables:
        for fn in table.values():
            owner = getattr(fn, "__module__", None) or type(fn).__module__
            if owner.startswith("vtprune"):
                found.append(f"{name}.{attr}: {getattr(fn, '__qualname__', fn)!r}")
    return found


def _assert_untouched(model: nn.Module, hooks_before: dict | None = None) -> None:
    """After a failed wrap: not wrapped, no handle, and no hook left behind (a leaked hook is a vtprune bug)."""
    assert not vtprune.is_wrapped(model)
    assert not hasattr(model, "vtprune"), "a failed wrap left model.vtprune behind"
    leaked = _vtprune_hooks(model)
    assert not leaked, f"BUG: a failed wrap left vtprune hooks behind: {leaked}"
    assert _hooks(model) == (hooks_before or {}), "BUG: a failed wrap changed the model's hooks"


def _wrap_fails(model, error: type[Exception], needles: list[str], *args, **kwargs) -> str:
    """wrap(model, *args, **kwargs) raises ``error`` whose message contains every needle; the model is untouched."""
    hooks_before = _hooks(model)
    with pytest.raises(error) as info:
        vtprune.wrap(model, *args, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error message: {message}"
    _assert_untouched(model, hooks_before)
    return message


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------------------------- wrap / unwrap
def test_wrap_is_in_place_and_refuses_a_second_wrap(factory):
    model = factory.build("sdpa")
    returned = vtprune.wrap(model, "uniform", keep=0.25)
    assert returned is model
    assert vtprune.is_wrapped(model)
    assert isinstance(model.vtprune, vtprune.VTPruneHandle)
    assert model.vtprune.config == UniformConfig(keep=0.25)
    hooks = _hooks(model)
    with pytest.raises(ValueError, match="unwrap"):
        vtprune.wrap(model, "random", keep=0.5)
    # The refused second wrap changed nothing.
    assert model.vtprune.config == UniformConfig(keep=0.25)
    assert _hooks(model) == hooks


def test_unwrap_restores_weights_outputs_and_hooks(factory):
    model = factory.build("sdpa")
    never_wrapped = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2, prefix=1)])
    expected = _logits(never_wrapped, inputs)
    assert torch.equal(_logits(model, inputs), expected)
    # transformers installs its own output-recording hooks at the first forward; those must survive untouched.
    hooks_before = _hooks(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    vtprune.wrap(model, "uniform", keep=0.25)
    assert _vtprune_hooks(model)
    pruned = _logits(model, inputs)
    # The last position is a text token in both runs; pruning 3/4 of the visual tokens must change it.
    assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4), "wrap did not change the outputs"

    assert vtprune.unwrap(model) is model
    assert not vtprune.is_wrapped(model)
    assert not hasattr(model, "vtprune")
    assert torch.equal(_logits(model, inputs), expected)
    state_after = model.state_dict()
    assert list(state_after) == list(state_before)
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key
    assert _vtprune_hooks(model) == []
    assert _hooks(model) == hooks_before


def test_unwrap_leaves_no_hook_at_all(factory):
    # A model that never ran a forward has no transformers hooks either, so every hook dict must be empty.
    model = factory.build("sdpa")
    assert _hooks(model) == {}
    vtprune.wrap(model, "random", keep=0.25, where="llm:1")
    assert _hooks(model) != {}
    vtprune.unwrap(model)
    for name, module in model.named_modules():
        for attr in HOOK_DICTS:
            assert not getattr(module, attr), f"{name or 'model'}.{attr} is not empty after unwrap"
    assert not hasattr(model, "vtprune")


def test_unwrap_of_an_unwrapped_model_raises(factory):
    model = factory.build("sdpa")
    with pytest.raises(ValueError, match="not wrapped"):
        vtprune.unwrap(model)
    vtprune.wrap(model, "uniform", keep=0.5)
    vtprune.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        vtprune.unwrap(model)


def test_wrap_unwrap_wrap_again(factory):
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)])
    n = factory.image_positions(model, inputs)[0][0].numel()
    expected = _logits(model, inputs)
    vtprune.wrap(model, "uniform", keep=0.25)
    _logits(model, inputs)
    assert model.vtprune.last_stats["samples"][0]["K_in"] == kept_count(0.25, n)
    vtprune.unwrap(model)

    vtprune.wrap(model, "random", keep=0.5, where="llm:1")
    assert model.vtprune.config == RandomConfig(keep=0.5, where="llm:1")
    pruned = _logits(model, inputs)
    stats = model.vtprune.last_stats["samples"][0]
    assert stats["tokens_per_layer"][1:] == [kept_count(0.5, n)] * (_num_layers(model) - 1)
    assert not torch.allclose(pruned[:, -1], expected[:, -1], atol=1e-4)
    vtprune.unwrap(model)
    assert torch.equal(_logits(model, inputs), expected)
    assert _vtprune_hooks(model) == []


# --------------------------------------------------------------------------------------------- config forms
def test_config_from_method_name_keep_and_options():
    model = LLAVA.build("sdpa")
    vtprune.wrap(model, "random", keep=0.5, where="llm:1", seed=3)
    assert model.vtprune.config == RandomConfig(keep=0.5, where="llm:1", seed=3)
    assert model.vtprune.config.method == "random"


def test_config_object_and_overrides():
    config = UniformConfig(keep=0.5, where="encoder")
    model = LLAVA.build("sdpa")
    vtprune.wrap(model, config)
    assert model.vtprune.config == config
    vtprune.unwrap(model)
    # keep= and options passed next to a config object override its fields, the rest stays.
    vtprune.wrap(model, config, keep=0.25, budget="average")
    assert model.vtprune.config == UniformConfig(keep=0.25, where="encoder", budget="average")
    assert config.keep == 0.5, "wrap must not mutate the caller's (frozen) config"


def test_config_dict():
    model = LLAVA.build("sdpa")
    vtprune.wrap(model, {"method": "uniform", "keep": 0.5})
    assert model.vtprune.config == UniformConfig(keep=0.5)


def test_config_dict_without_method_raises():
    model = LLAVA.build("sdpa")
    _wrap_fails(model, ValueError, ["'method'"], {"keep": 0.5})


@pytest.mark.parametrize("as_str", [False, True], ids=["pathlike", "str"])
def test_config_json_path_round_trips(tmp_path, as_str):
    config = RandomConfig(keep=0.75, where="llm:1", budget="average", seed=7)
    path = tmp_path / "pruner.json"
    config.save(path)
    data = json.loads(path.read_text())
    assert data["method"] == "random"
    assert data["version"] == CONFIG_VERSION
    loaded = PrunerConfig.load(path)
    assert type(loaded) is RandomConfig
    assert loaded == config
    model = LLAVA.build("sdpa")
    vtprune.wrap(model, str(path) if as_str else path)
    assert model.vtprune.config == config


def test_config_json_from_a_newer_version_raises(tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps({**UniformConfig(keep=0.5).to_dict(), "version": CONFIG_VERSION + 1}))
    with pytest.raises(ValueError, match="newer vtprune"):
        PrunerConfig.load(path)
    model = LLAVA.build("sdpa")
    _wrap_fails(model, ValueError, ["newer", "upgrade"], path)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_lists():
    methods = vtprune.list_methods()
    assert {"random", "uniform"} <= set(methods)
    assert methods == sorted(methods)
    assert "llava" in vtprune.list_models()


def test_unknown_method_suggests_the_closest():
    model = LLAVA.build("sdpa")
    _wrap_fails(model, ValueError, ["'unifrom'", "Did you mean 'uniform'", str(vtprune.list_methods())], "unifrom")


def test_unknown_family_renamed_model_type():
    model = LLAVA.build("sdpa")
    model.config.model_type = "lava"
    _wrap_fails(model, ValueError, ["'lava'", "Supported", "llava"], "uniform", keep=0.5)


def test_unknown_family_text_only_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    _wrap_fails(model, ValueError, ["'llama'", "Supported"], "uniform", keep=0.5)


def test_duplicate_pruner_name_raises_and_leaves_registry_unchanged():
    vtprune.list_methods()  # load the built-in methods first, so that "uniform" is taken
    before = dict(PRUNERS)

    @dataclasses.dataclass(frozen=True)
    class DummyConfig(PrunerConfig):
        method = "uniform"

    class Dummy(Pruner):
        config_cls = DummyConfig
        points = ("projector",)

        def select(self, ctx):
            raise AssertionError

    with pytest.raises(ValueError, match="'uniform' is already registered"):
        register_pruner(Dummy)
    assert PRUNERS == before
    assert Dummy.name == ""


def test_duplicate_adapter_raises_and_leaves_registry_unchanged():
    vtprune.list_models()
    before = dict(ADAPTERS)

    class Dummy:
        pass

    with pytest.raises(ValueError, match="'llava' is already registered"):
        register_adapter("llava")(Dummy)
    assert ADAPTERS == before


@pytest.mark.parametrize(
    "register", ["register_pruner", "register_adapter('llava')"], ids=["pruner", "adapter"]
)
def test_duplicate_of_a_builtin_raises_in_a_fresh_process(register):
    # Registering before anything has loaded the built-ins must still see them; otherwise the user's class
    # silently takes the built-in's name and the built-in's own registration breaks the package afterwards.
    code = (
        "import dataclasses, vtprune\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class DummyConfig(vtprune.PrunerConfig):\n"
        "    method = 'uniform'\n"
        "class Dummy:\n"
        "    config_cls = DummyConfig\n"
        "    points = ('projector',)\n"
        "try:\n"
        f"    vtprune.{register}(Dummy)\n"
        "except ValueError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('duplicate of a built-in name was accepted')\n"
        "assert {'random', 'uniform'} <= set(vtprune.list_methods())\n"
        "assert 'llava' in vtprune.list_models()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("keep", [0, 1.5, -0.1])
def test_keep_out_of_range(keep):
    model = LLAVA.build("sdpa")
    _wrap_fails(model, ValueError, ["(0, 1]", f"keep={keep}"], "uniform", keep=keep)


def test_keep_not_a_number():
    model = LLAVA.build("sdpa")
    _wrap_fails(model, TypeError, ["keep", "str"], "uniform", keep="a")


@pytest.mark.parametrize("method", ["uniform", "random"])
def test_option_the_method_does_not_take(method):
    model = LLAVA.build("sdpa")
    options = [f.name for f in dataclasses.fields(vtprune.registry.get_pruner_class(method).config_cls)]
    message = _wrap_fails(model, ValueError, ["'sed'", str(options)], method, keep=0.5, sed=1)
    if "seed" in options:
        assert "Did you mean 'seed'" in message
    else:
        assert "Did you mean" not in message


def test_where_past_the_last_layer():
    model = LLAVA.build("sdpa")
    layers = _num_layers(model)
    message = _wrap_fails(model, ValueError, ["llm:99"], "uniform", keep=0.5, where="llm:99")
    assert re.search(rf"\b{layers} (decoder )?layers", message), f"the number of layers is not named: {message}"


def test_where_unknown_point():
    model = LLAVA.build("sdpa")
    _wrap_fails(
        model, ValueError, ["'middle'", "'encoder'", "'projector'", "'llm:K'", "'decode:K'"],
        "uniform", keep=0.5, where="middle",
    )


def test_budget_unknown():
    model = LLAVA.build("sdpa")
    _wrap_fails(model, ValueError, ["'avg'", "'input'", "'average'"], "uniform", keep=0.5, budget="avg")


def test_average_budget_that_cannot_be_met():
    model = LLAVA.build("sdpa")
    last = _num_layers(model) - 1
    _wrap_fails(
        model, ValueError, ["budget='average'", "cannot be met", f"layer {last}"],
        "uniform", keep=0.1, budget="average", where=f"llm:{last}",
    )


@pytest.mark.parametrize("target", ["a string", nn.Linear(2, 2)], ids=["str", "linear"])
def test_wrap_needs_a_model(target):
    with pytest.raises(TypeError, match="wrap needs a transformers model"):
        vtprune.wrap(target, "uniform", keep=0.5)
    if isinstance(target, nn.Module):
        _assert_untouched(target)


# ------------------------------------------------------------------------------------------- runtime behaviour
def test_text_only_prompt_runs_unpruned_and_warns_once(factory, caplog):
    model = factory.build("sdpa")
    never_wrapped = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=0, prefix=5, suffix=3)])
    assert "pixel_values" not in inputs
    assert not (inputs["input_ids"] == model.config.image_token_id).any()
    expected = _logits(never_wrapped, inputs)
    vtprune.wrap(model, "uniform", keep=0.25)
    caplog.set_level(logging.WARNING, logger="vtprune")
    first = _logits(model, inputs)
    second = _logits(model, inputs)
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)
    warnings = [r for r in caplog.records if r.name == "vtprune" and "without image tokens" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert warnings[0].levelno == logging.WARNING
    assert model.vtprune.last_stats is None


def test_labels_through_a_pruned_model_raise(factory):
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)])
    vtprune.wrap(model, "uniform", keep=0.25)
    with pytest.raises(ValueError, match="negative indexing"), torch.no_grad():
        model(**inputs, labels=inputs["input_ids"])


def test_labels_work_at_keep_one(factory):
    model = factory.build("sdpa")
    never_wrapped = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1), Prompt(images=2, prefix=1)])
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = never_wrapped(**inputs, labels=labels).loss
        vtprune.wrap(model, "uniform", keep=1.0)
        got = model(**inputs, labels=labels).loss
    assert torch.isfinite(got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_last_stats(factory):
    model = factory.build("sdpa")
    prompts = [Prompt(images=1), Prompt(images=2, prefix=1)]
    inputs = factory.inputs(model, prompts)
    # Per sample, the token count of each image (AnyRes / InternVL images differ in size).
    sizes = [[p.numel() for p in sample] for sample in factory.image_positions(model, inputs)]
    layers = _num_layers(model)
    vtprune.wrap(model, "uniform", keep=0.25, where="llm:1")
    assert model.vtprune.last_stats is None
    _logits(model, inputs)
    stats = model.vtprune.last_stats
    assert len(stats["samples"]) == len(prompts)
    for sample, prompt, counts in zip(stats["samples"], prompts, sizes, strict=True):
        kept = [kept_count(0.25, n) for n in counts]
        assert len(counts) == prompt.images
        assert [(s["point"], s["layer"]) for s in sample["stages"]] == [("llm", 1)]
        assert [len(k) for k in sample["stages"][0]["kept"]] == kept
        assert sample["tokens_per_layer"] == [sum(counts)] + [sum(kept)] * (layers - 1)
        assert sample["K_in"] == sum(counts)
        assert sample["K_avg"] == pytest.approx(sum(sample["tokens_per_layer"]) / layers)


def test_generate_with_sampling_on_a_pruned_batch(factory):
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1, prefix=2), Prompt(images=2, prefix=4)], seed=5)
    vtprune.wrap(model, "uniform", keep=0.25)
    new = 5
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        with torch.no_grad():
            runs.append(
                model.generate(
                    **inputs, do_sample=True, top_k=5, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                )
            )
    batch, length = inputs["input_ids"].shape
    assert runs[0].shape == (batch, length + new)
    assert torch.equal(runs[0][:, :length], inputs["input_ids"])
    assert torch.equal(runs[0], runs[1]), "the same seed must give the same samples"
    expected = sum(kept_count(0.25, p.numel()) for p in factory.image_positions(model, inputs)[1])
    assert model.vtprune.last_stats["samples"][1]["K_in"] == expected


def test_disable_triton_env_is_harmless_on_cpu(factory, monkeypatch):
    monkeypatch.setenv("VTPRUNE_DISABLE_TRITON", "1")
    model = factory.build("sdpa")
    inputs = factory.inputs(model, [Prompt(images=1)])
    vtprune.wrap(model, "random", keep=0.5, where="llm:2")
    logits = _logits(model, inputs)
    assert torch.isfinite(logits).all()
    assert model.vtprune.last_stats["samples"][0]["tokens_per_layer"][-1] == kept_count(
        0.5, factory.image_positions(model, inputs)[0][0].numel()
    )


def test_a_pruner_without_where_must_define_its_plan():
    from vtprune.config import PrunerConfig
    from vtprune.pruners.base import Pruner

    class NoPlan(Pruner):
        points = ("projector",)

        def select(self, ctx):
            raise AssertionError("never reached")

    with pytest.raises(TypeError, match="must define plan"):
        NoPlan(PrunerConfig(keep=0.5))
