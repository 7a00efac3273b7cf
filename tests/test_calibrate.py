"""``vtprune.calibrate``: optuna search over a method's ``search_space`` on the last-token discrepancy; every
calibratable method's search space is well formed; bad arguments raise before any forward; a resumed study
continues; the returned config saves and loads into ``wrap``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import FACTORIES, Prompt

import vtprune
from vtprune.calibrate import calibratable_methods, calibrate, check_search_space, discrepancy, last_hidden
from vtprune.config import WhereConfig
from vtprune.registry import get_pruner_class

LLAVA = FACTORIES["llava"]
PROMPTS = [Prompt(images=1, prefix=3, suffix=4), Prompt(images=1, prefix=7, suffix=4)]


@pytest.fixture(autouse=True)
def _require_optuna() -> None:
    if importlib.util.find_spec("optuna") is None:
        pytest.fail("optuna not installed: install the calibrate extra: pip install -e '.[calibrate]'")


@pytest.fixture(scope="module")
def model_and_samples():
    torch.manual_seed(0)
    model = LLAVA.build("sdpa")
    return model, [LLAVA.inputs(model, PROMPTS, seed=s) for s in (0, 1)]


@pytest.mark.parametrize("method", calibratable_methods())
def test_every_declared_search_space_is_well_formed(method):
    check_search_space(get_pruner_class(method).config_cls)


def test_malformed_search_spaces_are_named():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Bad(WhereConfig):
        search_space = {"keep": ("float", 0.1, 0.5)}

    with pytest.raises(ValueError, match="keep and budget never are"):
        check_search_space(Bad)
    Bad.search_space = {"where": ("float", 2.0, 1.0)}
    with pytest.raises(ValueError, match="low < high"):
        check_search_space(Bad)
    Bad.search_space = {"where": ("grid", 1)}
    with pytest.raises(ValueError, match="must be a tuple starting with"):
        check_search_space(Bad)


def test_discrepancy_is_zero_unpruned_and_positive_pruned(model_and_samples):
    model, samples = model_and_samples
    reference = last_hidden(model, samples[0])
    assert float(discrepancy(reference, reference)) == 0.0
    vtprune.wrap(model, "fastv", keep=0.25)
    try:
        assert float(discrepancy(last_hidden(model, samples[0]), reference)) > 0
    finally:
        vtprune.unwrap(model)


def test_calibrate_finds_a_feasible_config_saves_loads_and_resumes(model_and_samples, tmp_path):
    model, samples = model_and_samples
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    config = calibrate(model, "dart", samples, keep=0.5, trials=4, seed=0, storage=storage, show_progress=False)
    assert config.method == "dart" and config.keep == 0.5 and config.budget == "input"
    assert not vtprune.is_wrapped(model)
    path = tmp_path / "dart.json"
    config.save(path)
    vtprune.wrap(model, path)
    assert model.vtprune.config == config
    vtprune.unwrap(model)
    # Resuming with more trials continues the same study: the best can only improve or stay.
    import optuna

    again = calibrate(model, "dart", samples, keep=0.5, trials=6, seed=0, storage=storage, show_progress=False)
    study = optuna.load_study(study_name="dart-keep0.5-input", storage=storage)
    assert len(study.trials) == 6
    values = [t.value for t in study.trials]
    best = min(values)
    assert again == get_pruner_class("dart").config_cls(keep=0.5, **study.trials[values.index(best)].params)


def test_fixed_fields_leave_the_search(model_and_samples):
    model, samples = model_and_samples
    config = calibrate(model, "dart", samples[:1], keep=0.5, trials=2, fixed={"where": "llm:1"}, show_progress=False)
    assert config.where == "llm:1"


def test_calibrate_is_seeded(model_and_samples):
    model, samples = model_and_samples
    first = calibrate(model, "fastv", samples[:1], keep=0.5, trials=3, seed=3, show_progress=False)
    second = calibrate(model, "fastv", samples[:1], keep=0.5, trials=3, seed=3, show_progress=False)
    assert first == second


def test_bad_arguments_raise_before_any_forward(model_and_samples):
    model, samples = model_and_samples
    with pytest.raises(ValueError, match="no search_space"):
        calibrate(model, "uniform", samples, keep=0.5)
    with pytest.raises(ValueError, match="Unknown method|unknown method|not a registered"):
        calibrate(model, "nosuch", samples, keep=0.5)
    with pytest.raises(ValueError, match="keep"):
        calibrate(model, "fastv", samples, keep=1.5)
    with pytest.raises(ValueError, match="trials"):
        calibrate(model, "fastv", samples, keep=0.5, trials=0)
    with pytest.raises(ValueError, match="budget"):
        calibrate(model, "fastv", samples, keep=0.5, budget="mean")
    with pytest.raises(ValueError, match="nothing is left to tune"):
        calibrate(model, "fastv", samples, keep=0.5, fixed={"where": "llm:2"})
    with pytest.raises(ValueError, match="calibrate's own arguments"):
        calibrate(model, "dart", samples, keep=0.5, fixed={"budget": "average"})
    with pytest.raises(ValueError, match="non-empty"):
        calibrate(model, "fastv", [], keep=0.5)
    right = dict(samples[0])
    right["attention_mask"] = right["attention_mask"].clone()
    right["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="padded on the right"):
        calibrate(model, "fastv", [right], keep=0.5)
    with pytest.raises(TypeError, match="transformers model"):
        calibrate("model", "fastv", samples, keep=0.5)
    vtprune.wrap(model, "fastv", keep=0.5)
    try:
        with pytest.raises(ValueError, match="unwrapped"):
            calibrate(model, "fastv", samples, keep=0.5)
    finally:
        vtprune.unwrap(model)


def test_trials_that_cannot_meet_keep_are_never_chosen(model_and_samples):
    model, samples = model_and_samples
    # Under the average budget, FastV's layers before its drop hold every token: keep 0.02 is out of reach at any K.
    with pytest.raises(ValueError, match="no trial of fastv could meet keep=0.02"):
        calibrate(model, "fastv", samples[:1], keep=0.02, budget="average", trials=3, show_progress=False)
    assert not vtprune.is_wrapped(model)
