"""Calibration: tune a method's free parameters on a few unlabeled samples, without labels or training.

    import vtprune
    config = vtprune.calibrate(model, "vflowopt", samples, keep=0.11, trials=40, storage="sqlite:///calib.db")
    config.save("vflowopt_llava.json")
    vtprune.wrap(model, "vflowopt_llava.json")

The objective is VFlowOpt's flow-guided search (arXiv 2508.05211): the discrepancy between the last token's final
hidden state of the pruned and of the unpruned model, mean over the samples, ``||h - h_ref||^2 / ||h_ref||^2`` per
prompt, minimised by Bayesian optimisation over the fields in the method's ``config_cls.search_space`` (the official
code uses scikit-optimize's ``gp_minimize``; here optuna's seeded TPE sampler). Any method whose config declares a
search space can be calibrated (``calibratable_methods()``); ``keep`` and ``budget`` are fixed by the caller, so the
tuned config meets the same budget. A trial whose parameters cannot meet ``keep`` (the method's own ValueError) is
recorded as infeasible and never chosen. With ``storage`` (an optuna storage URL such as ``sqlite:///calib.db``) the
study is resumable: calling again with the same storage and study name continues it up to ``trials`` finished
trials. Needs optuna (``pip install "vtprune[calibrate]"``), imported only when calibrating.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.config import BUDGETS, PrunerConfig, check_options
from vtprune.registry import get_pruner_class, list_methods

KINDS = ("float", "log", "int", "choice")


def calibratable_methods() -> list[str]:
    """Registered methods whose config declares a ``search_space``."""
    return [m for m in list_methods() if get_pruner_class(m).config_cls.search_space]


def check_search_space(config_cls: type[PrunerConfig]) -> None:
    """Raise a ValueError naming the entry of ``config_cls.search_space`` that is malformed."""
    fields = {f for f in config_cls.__dataclass_fields__}
    for name, spec in config_cls.search_space.items():
        where = f"{config_cls.__name__}.search_space[{name!r}]"
        if name not in fields or name in ("keep", "budget"):
            raise ValueError(f"{where}: not a tunable field of {config_cls.__name__} (keep and budget never are).")
        if not isinstance(spec, tuple) or not spec or spec[0] not in KINDS:
            raise ValueError(f"{where} must be a tuple starting with one of {KINDS}, got {spec!r}.")
        if spec[0] == "choice":
            if len(spec) != 2 or not isinstance(spec[1], tuple) or not spec[1]:
                raise ValueError(f"{where}: a choice is ('choice', (value, ...)), got {spec!r}.")
        elif len(spec) != 3 or not spec[1] < spec[2] or (spec[0] == "log" and spec[1] <= 0):
            raise ValueError(f"{where}: a range is (kind, low, high) with low < high (and low > 0 for 'log'), "
                             f"got {spec!r}.")


def calibrate(
    model: nn.Module,
    method: str,
    samples: Iterable[Mapping[str, Any]],
    *,
    keep: float,
    budget: str = "input",
    trials: int = 30,
    seed: int = 0,
    fixed: Mapping[str, Any] | None = None,
    storage: Any = None,
    study_name: str | None = None,
    show_progress: bool = True,
) -> PrunerConfig:
    """Tune ``method``'s search-space fields on ``samples`` and return the best config (``keep``/``budget`` fixed).

    Args:
        model: an unwrapped ``...ForConditionalGeneration`` of a supported family; left unwrapped on return.
        method: a registered method with a ``search_space`` (``calibratable_methods()``).
        samples: model input batches (processor outputs: ``input_ids``, ``attention_mask``, pixel inputs), e.g. ~30
            unlabeled prompts in a few batches; the same batches are run for every trial.
        keep, budget: the budget every trial meets.
        trials: finished trials to reach (including those already in a resumed study).
        seed: seeds optuna's TPE sampler.
        fixed: config fields held at given values, taken out of the search if it has them, e.g.
            ``{"where": "llm:2"}`` (the objective alone favours late drops, which save less: fix the layer to tune
            the rest at the paper's depth).
        storage, study_name: an optuna storage (URL such as ``sqlite:///calib.db``, or a storage object) to resume
            from / write to, and the study's name in it (default ``"{method}-keep{keep}-{budget}"``).
        show_progress: optuna's tqdm bar over the trials.

    Returns:
        The config with the lowest discrepancy; ``config.save(path)`` writes it and ``vtprune.wrap(model, path)``
        loads it.

    Raises:
        ValueError: unknown or non-calibratable method, a bad ``keep`` / ``budget`` / ``trials`` / ``fixed``, no
            samples, or no trial that could meet ``keep``. ImportError: optuna is missing.
        TypeError: ``model`` is not a transformers model.
    """
    from vtprune.api import is_wrapped, unwrap, wrap

    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"calibrate needs a transformers model (nn.Module with .config), got {type(model).__name__}.")
    if is_wrapped(model):
        raise ValueError("calibrate needs the unwrapped model (it compares with it): call vtprune.unwrap(model).")
    config_cls = get_pruner_class(method).config_cls
    if not config_cls.search_space:
        raise ValueError(f"{method} declares no search_space, so there is nothing to calibrate; calibratable "
                         f"methods: {calibratable_methods()}.")
    check_search_space(config_cls)
    if budget not in BUDGETS:
        raise ValueError(f"budget={budget!r} is not one of {list(BUDGETS)}.")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}.")
    fixed = dict(fixed or {})
    check_options(config_cls, fixed)
    if {"keep", "budget"} & set(fixed):
        raise ValueError("keep and budget are calibrate's own arguments; drop them from fixed.")
    space = {name: spec for name, spec in config_cls.search_space.items() if name not in fixed}
    if not space:
        raise ValueError(f"fixed holds every field of {method}'s search space {sorted(config_cls.search_space)}: "
                         "nothing is left to tune.")
    config_cls(keep=keep, budget=budget, **fixed)  # checks keep and the fixed values before any forward
    batches = list(samples)
    if not batches or not all(isinstance(b, Mapping) and "input_ids" in b for b in batches):
        raise ValueError("samples must be a non-empty iterable of model input dicts with input_ids (processor "
                         "outputs), e.g. [processor(text=..., images=..., return_tensors='pt')].")
    for batch in batches:
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask[:, -1].all()):
            raise ValueError("a sample batch is padded on the right: the last token of each prompt must be the "
                             "last position; pad on the left (processor.tokenizer.padding_side = 'left').")
    try:
        import optuna
    except ImportError as error:
        raise ImportError('vtprune.calibrate needs optuna: pip install "vtprune[calibrate]".') from error

    reference = [last_hidden(model, batch) for batch in batches]

    def objective(trial) -> float:
        params = {name: suggest(trial, name, spec) for name, spec in space.items()}
        try:
            config = config_cls(keep=keep, budget=budget, **fixed, **params)
            wrap(model, config)
        except ValueError as error:  # these parameters cannot meet keep (or are inconsistent): never the best
            trial.set_user_attr("infeasible", str(error))
            return math.inf
        try:
            return float(sum(discrepancy(last_hidden(model, b), r) for b, r in zip(batches, reference, strict=True))
                         / len(batches))
        finally:
            unwrap(model)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed), storage=storage,
        study_name=study_name or f"{method}-keep{keep}-{budget}", load_if_exists=storage is not None)
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    if trials > done:
        study.optimize(objective, n_trials=trials - done, show_progress_bar=show_progress)
    feasible = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value)]
    if not feasible:
        raise ValueError(f"no trial of {method} could meet keep={keep} under budget={budget!r}; raise keep or "
                         "widen the search space.")
    best = min(feasible, key=lambda t: t.value)
    return config_cls(keep=keep, budget=budget, **fixed, **best.params)


def suggest(trial, name: str, spec: tuple) -> Any:
    kind = spec[0]
    if kind == "choice":
        return trial.suggest_categorical(name, list(spec[1]))
    if kind == "int":
        return trial.suggest_int(name, int(spec[1]), int(spec[2]))
    return trial.suggest_float(name, float(spec[1]), float(spec[2]), log=kind == "log")


@torch.no_grad()
def last_hidden(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """(B, D) fp32 final hidden state of each prompt's last token (prompts padded on the left), one forward."""
    out = model(**batch, use_cache=False, output_hidden_states=True)
    return out.hidden_states[-1][:, -1].float()


def discrepancy(hidden: Tensor, reference: Tensor) -> Tensor:
    """Mean over prompts of ||h - h_ref||^2 / ||h_ref||^2."""
    return ((hidden - reference).square().sum(-1) / reference.square().sum(-1).clamp_min(1e-12)).mean()
