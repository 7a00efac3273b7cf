"""vtprune: prune, merge or down-sample the visual tokens of Hugging Face vision-language models.

    import vtprune
    vtprune.wrap(model, method="uniform", keep=0.11)
    model.generate(**inputs)

    result = vtprune.train(model, method="uniform", data=batches)  # LoRA recovery fine-tune, merged back
    config = vtprune.calibrate(model, "dart", samples, keep=0.11)  # tune a method's parameters, unlabeled

Importing vtprune loads neither triton, lmms-eval, gradio, peft, accelerate nor optuna, and does not initialise CUDA.
"""

from vtprune.api import VTPruneHandle, unwrap, wrap
from vtprune.api import is_wrapped as is_wrapped
from vtprune.calibrate import calibrate
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
    "calibrate",
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
