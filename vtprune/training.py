"""Recovery fine-tuning: LoRA on the language model while a pruning method runs, with a curriculum over keep ratios.

    import vtprune
    result = vtprune.train(model, method="uniform", data=batches, where="llm:2",
                           config=vtprune.TrainConfig(keeps=(0.11, 0.22, 0.33), steps=300))
    model = result.model  # the same transformers model, LoRA merged into its weights, unwrapped, in eval mode

Pruning inside the LLM makes the final hidden sequence shorter than ``input_ids``, so transformers' own ``labels=``
loss cannot run on a pruned forward. vtprune keeps every non-visual token, in order, at the right end of the
sequence (fillers for samples that keep fewer tokens go to the left, like left padding), so the text after the last
image keeps its place counted from the end: the loss reads the last ``T + 1`` logits (``logits_to_keep``) and
compares them with the last ``T`` labels, where ``T`` spans the supervised tokens of the batch. That needs every
supervised token to come after the last visual token of its row, with at least one text token in between (the
logit that predicts the first answer token must not sit on a visual token that may be dropped); chat prompts such as
``USER: ... <image> ASSISTANT: answer`` satisfy it.

peft and accelerate are imported only when ``train`` runs (``pip install 'vtprune[train]'``), so ``import vtprune``
stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vtprune.api import is_wrapped, unwrap, wrap
from vtprune.config import BUDGETS, PrunerConfig
from vtprune.registry import get_adapter_class, get_pruner_class

logger = logging.getLogger("vtprune")

CURRICULA = ("reverse", "forward", "mixed")
TRAIN_CONFIG_VERSION = 1
IGNORE_INDEX = -100


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class TrainConfig:
    """How ``vtprune.train`` fine-tunes a model to recover from pruning.

    Attributes:
        keeps: the keep ratios trained at, each in (0, 1]; one phase per ratio (reverse / forward curricula).
        curriculum: "reverse" runs the phases from the strongest compression (smallest keep) to the mildest,
            "forward" from the mildest to the strongest, "mixed" draws a keep from ``keeps`` for every step
            (seeded by ``seed``).
        steps: total optimizer steps, split evenly over the phases (earlier phases take the remainder; with fewer
            steps than phases the last phases get none, which ``train`` warns about).
        lr: peak learning rate of AdamW on the LoRA parameters.
        warmup_steps: linear warm-up steps before the cosine decay to zero at ``steps``.
        lora_rank: rank r of the LoRA updates.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_dropout: dropout on the LoRA input, in [0, 1).
        target_modules: names (or dotted name suffixes, e.g. "q_proj" or "self_attn.q_proj") of the ``nn.Linear``
            modules inside the language model's decoder layers that get LoRA; None takes every ``nn.Linear`` there.
            Names are only matched under ``model.model.language_model.layers``, never in the vision tower or the
            projector, so the visual features the pruner scores stay what the method was designed on.
        budget: the pruning budget convention passed to ``vtprune.wrap``: "input" or "average".
        seed: seeds torch, Python and numpy (LoRA initialisation, dropout) and the "mixed" curriculum.
        max_grad_norm: gradient-norm clipping threshold, > 0.
        log_every: steps between entries of ``TrainResult.log`` (the first step and the last step of every phase
            are logged too).
        head_temperature: methods with learned heads (atp) only: the sharpness T of the soft masks σ((s − θ)·T)
            that stand in for the hard drops while the heads train, > 0.
        budget_weight: methods with learned heads only: weight of the budget loss next to the LM loss, >= 0.
    """

    keeps: tuple[float, ...] = (0.11, 0.22, 0.33)
    curriculum: str = "reverse"
    steps: int = 300
    lr: float = 2e-4
    warmup_steps: int = 20
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    budget: str = "input"
    seed: int = 0
    max_grad_norm: float = 1.0
    log_every: int = 10
    head_temperature: float = 5.0
    budget_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.keeps, (str, bytes)) or not isinstance(self.keeps, Iterable):
            raise ValueError(
                f"keeps must be a sequence of keep ratios such as (0.11, 0.22, 0.33), got {self.keeps!r}."
            )
        keeps = tuple(self.keeps)
        if not keeps:
            raise ValueError("keeps is empty; give at least one keep ratio in (0, 1], e.g. keeps=(0.11,).")
        for keep in keeps:
            if not _is_number(keep) or not 0.0 < float(keep) <= 1.0:
                raise ValueError(
                    f"keeps contains {keep!r}, outside (0, 1]. Each entry is the fraction of visual tokens kept, "
                    "e.g. 0.11 keeps about 64 of 576."
                )
        # Normalised so that a list given by the user compares, hashes and serialises like the default tuple.
        object.__setattr__(self, "keeps", tuple(float(keep) for keep in keeps))
        if self.curriculum not in CURRICULA:
            raise ValueError(f"curriculum={self.curriculum!r} is not one of {list(CURRICULA)}.")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}.")
        if not _is_number(self.lr) or not self.lr > 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}.")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}.")
        if not _is_int(self.lora_rank) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank!r}.")
        if not _is_int(self.lora_alpha) or self.lora_alpha < 1:
            raise ValueError(f"lora_alpha must be a positive integer, got {self.lora_alpha!r}.")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not isinstance(self.target_modules, Iterable):
                raise ValueError(
                    f"target_modules must be a sequence of module names such as ('q_proj', 'v_proj') or None, got "
                    f"{self.target_modules!r}."
                )
            names = tuple(self.target_modules)
            if not names or not all(isinstance(name, str) and name for name in names):
                raise ValueError(
                    f"target_modules must hold at least one non-empty module name, got {self.target_modules!r}; "
                    "use None for every nn.Linear of the decoder layers."
                )
            object.__setattr__(self, "target_modules", names)
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} is not one of {list(BUDGETS)}.")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")
        if not _is_number(self.max_grad_norm) or not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be a positive number, got {self.max_grad_norm!r}.")
        if not _is_int(self.log_every) or self.log_every < 1:
            raise ValueError(f"log_every must be a positive integer, got {self.log_every!r}.")
        if not _is_number(self.head_temperature) or not self.head_temperature > 0:
            raise ValueError(f"head_temperature must be a positive number, got {self.head_temperature!r}.")
        if not _is_number(self.budget_weight) or not self.budget_weight >= 0:
            raise ValueError(f"budget_weight must be a number >= 0, got {self.budget_weight!r}.")

    def schedule(self) -> list[float]:
        """The keep ratio of every optimizer step, in order (``steps`` entries)."""
        if self.curriculum == "mixed":
            rng = random.Random(self.seed)
            return [rng.choice(self.keeps) for _ in range(self.steps)]
        order = sorted(self.keeps, reverse=self.curriculum == "forward")
        base, extra = divmod(self.steps, len(order))
        return [keep for phase, keep in enumerate(order) for _ in range(base + (phase < extra))]

    def lr_scale(self, step: int) -> float:
        """Multiplier of ``lr`` at 0-based optimizer step ``step``: linear warm-up, then cosine decay to zero."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with a version."""
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body["keeps"] = list(self.keeps)
        body["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return {"version": TRAIN_CONFIG_VERSION, **body}


@dataclass
class TrainResult:
    """What ``vtprune.train`` returns.

    Attributes:
        model: the model that was passed in (the same object), LoRA merged into its weights, without vtprune hooks,
            in eval mode, on the device it was trained on.
        log: one dict per logged step: ``{"step": 1-based step, "keep": keep ratio, "loss": that step's loss}``.
        seconds: wall-clock seconds of the whole call.
        steps: optimizer steps taken.
        config: the TrainConfig used.
        method_config: for methods with learned heads (atp), the method's config carrying the trained heads, at the
            curriculum's first keep: ``result.method_config.replace(keep=0.11).save(path)`` writes a file that
            ``vtprune.wrap(model, path)`` loads. None after a LoRA fine-tune.
    """

    model: nn.Module
    log: list[dict[str, Any]]
    seconds: float
    steps: int
    config: TrainConfig
    method_config: PrunerConfig | None = None


# ---------------------------------------------------------------------------------------------------------- loss
def visual_token_ids(model: nn.Module) -> Tensor:
    """(V,) ids of the visual placeholder tokens of a supported VLM, as its family adapter lists them."""
    if is_wrapped(model):
        return model.vtprune.engine.visual_ids
    # A family only reads the model's config; nothing is registered on the model.
    family = get_adapter_class(getattr(model.config, "model_type", type(model).__name__))(model)
    return torch.tensor(family.visual_token_ids(), dtype=torch.long)


def tail_length(input_ids: Tensor, labels: Tensor, visual_ids: Tensor) -> int:
    """Number T of trailing label columns that hold every supervised token of the batch, checking that the last
    ``T + 1`` positions of every row that has supervised tokens survive pruning in place.

    Args:
        input_ids: (B, L) token ids.
        labels: (B, L) targets, ``-100`` where not supervised (transformers' convention). Column 0 is never scored,
            as in transformers' loss: no token precedes it.
        visual_ids: (V,) ids of the visual placeholder tokens.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}; give one label per "
            "token, -100 where the token is not supervised."
        )
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)
    supervised = (labels != IGNORE_INDEX) & (positions > 0)
    first = torch.where(supervised, positions, length).amin(1)
    last_visual = torch.where(torch.isin(input_ids, visual_ids.to(input_ids.device)), positions, -1).amax(1)
    # The logit predicting the first supervised token sits one position earlier; it must be a text token.
    bad = supervised.any(1) & (first < last_visual + 2)
    # One sync per batch: logits_to_keep takes a Python int.
    start, any_bad = torch.stack((first.min(), bad.any().long())).tolist()
    if any_bad:
        row = int(bad.long().argmax())
        raise ValueError(
            f"Row {row} of the batch supervises position {int(first[row])}, but its last image/video token is at "
            f"position {int(last_visual[row])}. vtprune.train needs every supervised token (labels != -100) to "
            "come after the last visual token of its row with at least one text token in between (e.g. "
            "'USER: ... <image> ASSISTANT: answer'), because pruning drops visual tokens and only the text after "
            "the last image keeps its place. Set those labels to -100 or move the images before the supervised text."
        )
    if start >= length:
        raise ValueError(
            "This batch has no supervised tokens (every label is -100, or only column 0 is labelled). Label the "
            "answer tokens with their ids and everything else with -100."
        )
    return length - start


def _check_batch(batch: Mapping[str, Any]) -> None:
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(
            f"Each batch needs input_ids and labels (-100 where not supervised); got keys {sorted(batch)}."
        )


def tail_forward(model: Callable[..., Any], batch: Mapping[str, Any], visual_ids: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """One forward of a batch with ``labels`` that computes only the trailing logits the labels need.

    Args:
        model: a ``...ForConditionalGeneration`` (wrapped by vtprune or not, or accelerate's wrapper of one).
        batch: model inputs plus labels (B, L), -100 where not supervised; not modified.
        visual_ids: (V,) ids of the visual placeholder tokens (``tail_length`` checks none is in the tail).

    Returns:
        (loss, logits, labels): the causal-LM cross-entropy (mean over supervised tokens, fp32 softmax as
        transformers' own loss), the logits (B, T + 1, vocab) of the last T + 1 positions and their labels
        (B, T + 1); logits[:, t] predicts labels[:, t + 1].
    """
    _check_batch(batch)
    inputs = dict(batch)
    labels = inputs.pop("labels")
    tail = tail_length(inputs["input_ids"], labels, visual_ids)
    logits = model(**inputs, use_cache=False, logits_to_keep=tail + 1).logits
    labels = labels[:, -(tail + 1):]
    loss = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    return loss, logits, labels


def tail_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Causal-LM cross-entropy of a batch with ``labels``, valid on a pruned model (see the module docstring).

    Args:
        model: a ``...ForConditionalGeneration`` of a supported family, wrapped by vtprune or not.
        batch: model inputs plus labels (B, L), -100 where not supervised; not modified.

    Returns:
        The mean over supervised tokens, equal to ``model(**batch).loss`` of the unpruned model.
    """
    return tail_forward(model, batch, visual_token_ids(model))[0]


# ------------------------------------------------------------------------------------------------------ training
def _passes(data: Any) -> Iterator[Iterator[Any]]:
    """A fresh iterator over ``data`` for every pass."""
    if isinstance(data, Mapping):
        raise TypeError("data is a single batch (a mapping); pass an iterable of batches, e.g. [batch].")
    while True:
        if hasattr(data, "__iter__"):
            yield iter(data)
        elif callable(data):
            yield iter(data())
        else:
            raise TypeError(
                f"data must be an iterable of batches or a callable returning an iterator, got {type(data).__name__}."
            )


def _batches(data: Any) -> Iterator[Mapping[str, Any]]:
    """Batches of ``data``, starting a new pass whenever one ends."""
    seen = 0
    for batches in _passes(data):
        count = 0
        for batch in batches:
            # A mapping, not only a dict: processors return BatchEncoding, a UserDict.
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"Each batch must be a mapping of model inputs plus labels, got {type(batch).__name__}."
                )
            count += 1
            yield batch
        if count == 0:
            if seen == 0:
                raise ValueError("data yielded no batches; give at least one batch of inputs with labels.")
            raise ValueError(
                f"data ran out after {seen} batches and a new pass over it yielded none (a one-shot generator?). "
                "Pass a list, a re-iterable such as a DataLoader, or a callable that returns a fresh iterator; or "
                "lower config.steps."
            )
        seen += count


def _decoder_linear_names(model: nn.Module, wanted: tuple[str, ...] | None) -> list[str]:
    """Full names (relative to ``model``) of the ``nn.Linear`` modules of the language model's decoder layers."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    layers = getattr(language_model, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no model.language_model.layers; pass the transformers "
            "...ForConditionalGeneration model (not a peft or accelerate wrapper around it)."
        )
    prefix = {id(module): name for name, module in model.named_modules()}[id(layers)]
    names = [f"{prefix}.{name}" for name, module in layers.named_modules() if isinstance(module, nn.Linear)]
    if wanted is None:
        return names
    chosen = []
    for target in wanted:
        hits = [name for name in names if name.endswith("." + target)]
        if not hits:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
            raise ValueError(
                f"target_modules entry {target!r} matches no nn.Linear of the language model's decoder layers. "
                f"Linear modules there: {leaves}."
            )
        chosen += hits
    return sorted(set(chosen), key=names.index)


def _move(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def train(
    model: nn.Module,
    method: str,
    data: Iterable[Mapping[str, Any]] | Callable[[], Iterator[Mapping[str, Any]]],
    config: TrainConfig | None = None,
    progress: bool = True,
    **options: Any,
) -> TrainResult:
    """Fine-tune LoRA adapters on the language model while ``method`` prunes, then merge them into the weights.

    For each phase of the curriculum (``config.schedule()``), the method is installed with ``vtprune.wrap(model,
    method, keep=k, budget=config.budget, **options)`` and removed after the phase. The loss is the causal-LM
    cross-entropy on the supervised tail (see the module docstring). The model moves to accelerate's device
    (CUDA when present, with bf16 autocast) and stays there.

    Args:
        model: a ``...ForConditionalGeneration`` of a supported family, not wrapped by vtprune.
        method: a registered method name (``vtprune.list_methods()``).
        data: an iterable of batches (a list, a DataLoader) or a callable returning an iterator of batches; each
            batch a dict of model inputs (input_ids (B, L), attention_mask (B, L), pixel_values, ...) plus labels
            (B, L), -100 where not supervised. When a pass ends before ``config.steps`` a new pass starts.
        config: the recipe; ``TrainConfig()`` when None.
        progress: show a tqdm bar with the phase's keep and the running loss.
        **options: method options for ``vtprune.wrap`` (e.g. ``where="llm:2"``).

    Returns:
        A TrainResult whose ``model`` is ``model`` itself, LoRA merged, unwrapped, in eval mode.
    """
    started = time.perf_counter()
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a vtprune.TrainConfig, got {type(config).__name__}.")
    get_pruner_class(method)
    for name in ("keep", "budget"):
        if name in options:
            raise ValueError(
                f"Pass {name} through the TrainConfig ({'keeps' if name == 'keep' else 'budget'}=...), not as a "
                "method option: train installs the method once per keep of the curriculum."
            )
    if is_wrapped(model):
        raise ValueError(
            "This model is already wrapped by vtprune. Call vtprune.unwrap(model) first: train installs the method "
            "itself for every keep of the curriculum."
        )
    # A dry install per keep rejects bad options, insertion points and budgets before the model is touched.
    for keep in sorted(set(config.keeps)):
        unwrap(wrap(model, method, keep=keep, budget=config.budget, **options))
    soft_trainer = getattr(get_pruner_class(method), "soft_trainer", None)
    if soft_trainer is not None:
        return _train_heads(model, method, soft_trainer, data, config, progress, options, started)
    try:
        import peft
        from accelerate import Accelerator
        from accelerate.utils import set_seed
    except ImportError as error:
        raise ImportError(
            f"vtprune.train needs peft and accelerate ({error}). Install them with: pip install 'vtprune[train]'."
        ) from error
    from tqdm.auto import tqdm

    visual_ids = visual_token_ids(model)
    targets = _decoder_linear_names(model, config.target_modules)
    stream = _batches(data)
    first = next(stream)
    _check_batch(first)
    tail_length(first["input_ids"], first["labels"], visual_ids)

    schedule = config.schedule()
    skipped = sorted(set(config.keeps) - set(schedule))
    if skipped:
        logger.warning(
            "vtprune.train: steps=%d leaves no step for keep %s of the %r curriculum; raise steps to train at "
            "every keep.", config.steps, skipped, config.curriculum,
        )
    set_seed(config.seed)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    lora = peft.LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=targets
    )
    peft_model = peft.get_peft_model(model, lora)
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    merged = False
    log: list[dict[str, Any]] = []
    try:
        parameters = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_scale)
        prepared, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)
        prepared.train()
        running: Tensor | None = None
        current: float | None = None
        with tqdm(total=len(schedule), desc=f"vtprune train {method}", disable=not progress) as bar:
            for step, keep in enumerate(schedule, start=1):
                if keep != current:
                    if current is not None:
                        unwrap(model)
                    # The hooks go on the user's model itself: peft swapped its Linear layers in place, so the modules
                    # the adapter hooks (model.model, the language model, its layers) are the ones the forward runs.
                    wrap(model, method, keep=keep, budget=config.budget, **options)
                    current = keep
                batch = _move(first if step == 1 else next(stream), accelerator.device)
                with accelerator.autocast():
                    loss = tail_forward(prepared, batch, visual_ids)[0]
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # Kept on the device so that steps that are not logged do not wait for the GPU.
                running = loss.detach() if running is None else 0.9 * running + 0.1 * loss.detach()
                bar.update(1)
                phase_end = step == len(schedule) or (config.curriculum != "mixed" and schedule[step] != keep)
                if step == 1 or step % config.log_every == 0 or phase_end:
                    log.append({"step": step, "keep": keep, "loss": float(loss.detach())})
                    bar.set_postfix(keep=keep, loss=f"{float(running):.4f}")
        unwrap(model)
        peft_model = accelerator.unwrap_model(prepared, keep_fp32_wrapper=False)
        result_model = peft_model.merge_and_unload()
        merged = True
    finally:
        if is_wrapped(model):
            unwrap(model)
        if not merged:
            # Leave the user's model as it came in: LoRA layers out, nothing merged.
            peft_model.unload()
        accelerator.free_memory()
        # peft leaves its config on the model and freezes every base parameter; neither belongs to the user's model.
        model.__dict__.pop("peft_config", None)
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))
    if result_model is not model:
        raise RuntimeError("peft's merge_and_unload returned a different module than the model passed in.")
    model.eval()
    return TrainResult(model=model, log=log, seconds=time.perf_counter() - started, steps=config.steps, config=config)


def _train_heads(model: nn.Module, method: str, soft_trainer: Any, data: Any, config: TrainConfig, progress: bool,
                 options: dict[str, Any], started: float) -> TrainResult:
    """``train`` for a method with learned heads: the heads train with the LLM frozen, under the method's soft
    masks (``soft_trainer``, e.g. ``vtprune.pruners.atp.SoftATP``), on the LM loss plus ``budget_weight`` x its
    budget loss; the model itself is not changed."""
    from tqdm.auto import tqdm

    from vtprune.engine.probe import make_probe

    config_cls = get_pruner_class(method).config_cls
    visual_ids = visual_token_ids(model)
    stream = _batches(data)
    first = next(stream)
    _check_batch(first)
    tail_length(first["input_ids"], first["labels"], visual_ids)
    device = next(model.parameters()).device
    schedule = config.schedule()
    torch.manual_seed(config.seed)
    initial = config_cls(keep=schedule[0], budget=config.budget, **options)
    heads = soft_trainer.new_heads(model, initial).to(device)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_scale)
    def autocast() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # The soft masks are a float attention bias that needs a gradient; the memory-efficient kernel's
            # backward refuses some of those shapes ("LSE is not correctly aligned"), the math kernel takes every one.
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        return stack
    log: list[dict[str, Any]] = []
    soft = None
    current: float | None = None
    try:
        with tqdm(total=len(schedule), desc=f"vtprune train {method} heads", disable=not progress) as bar:
            for step, keep in enumerate(schedule, start=1):
                if keep != current:
                    if soft is not None:
                        soft.remove()
                    method_config = config_cls(keep=keep, budget=config.budget, **options)
                    soft = soft_trainer(model, method_config, visual_ids, heads, config.head_temperature,
                                        make_probe)
                    current = keep
                batch = _move(first if step == 1 else next(stream), device)
                with autocast():
                    lm_loss = tail_forward(model, batch, visual_ids)[0]
                budget_loss = soft.budget_loss()
                loss = lm_loss.float() + config.budget_weight * budget_loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(heads.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                phase_end = step == len(schedule) or (config.curriculum != "mixed" and schedule[step] != keep)
                if step == 1 or step % config.log_every == 0 or phase_end:
                    log.append({"step": step, "keep": keep, "loss": float(loss.detach()),
                                "lm_loss": float(lm_loss.detach()), "budget_loss": float(budget_loss.detach()),
                                "kept": soft.kept_shares()})
                    bar.set_postfix(keep=keep, lm=f"{log[-1]['lm_loss']:.4f}", budget=f"{log[-1]['budget_loss']:.4f}")
    finally:
        if soft is not None:
            soft.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, param.requires_grad))
        model.train(was_training)
    model.eval()
    trained = soft_trainer.export(heads, initial)
    return TrainResult(model=model, log=log, seconds=time.perf_counter() - started, steps=config.steps,
                       config=config, method_config=trained)
