"""vtprune: prune, merge or down-sample the visual tokens of Hugging Face vision-language models.

    import vtprune
    vtprune.wrap(model, method="uniform", keep=0.11)
    model.generate(**inputs)

    result = vtprune.train(model, method="uniform", data=batches)  # LoRA recovery fine-tune, merged back

Importing vtprune loads neither triton, lmms-eval, gradio, peft nor accelerate, and does not initialise CUDA.
"""

from vtprune.api import VTPruneHandle, unwrap, wrap
from vtprune.api import is_wrapped as is_wrapped
from vtprune.config import PrunerConfig, WhereConfig
from vtprune.point import Point
from vtprune.registry import list_methods, list_models, register_adapter, register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage
from vtprune.training import TrainConfig, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "ImageTokens",
    "Point",
    "PruneContext",
    "PrunerConfig",
    "Selection",
    "Stage",
    "TrainConfig",
    "TrainResult",
    "VTPruneHandle",
    "is_wrapped",
    "list_methods",
    "list_models",
    "register_adapter",
    "register_pruner",
    "train",
    "unwrap",
    "WhereConfig",
    "wrap",
]
