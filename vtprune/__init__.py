"""vtprune: prune, merge or down-sample the visual tokens of Hugging Face vision-language models.

    import vtprune
    vtprune.wrap(model, method="uniform", keep=0.11)
    model.generate(**inputs)

Importing vtprune loads neither triton, lmms-eval nor gradio, and does not initialise CUDA.
"""

from vtprune.api import VTPruneHandle, unwrap, wrap
from vtprune.api import is_wrapped as is_wrapped
from vtprune.config import PrunerConfig
from vtprune.registry import list_methods, list_models, register_adapter, register_pruner
from vtprune.state import ImageTokens, PruneContext, Selection, Stage

__version__ = "0.1.0"

__all__ = [
    "ImageTokens",
    "PruneContext",
    "PrunerConfig",
    "Selection",
    "Stage",
    "VTPruneHandle",
    "is_wrapped",
    "list_methods",
    "list_models",
    "register_adapter",
    "register_pruner",
    "unwrap",
    "wrap",
]
