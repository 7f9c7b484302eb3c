"""Training and evaluation: recipes, data, the loop (single process or DDP), ablations, plots.

The console commands ``cspmirror train | eval | ablate`` are thin layers over this package.
"""

from .ablation import PRESETS, parse_grid, run_ablation
from .data import DataConfig, DataNotFoundError, SyntheticPatterns, build_datasets
from .engine import FitResult, TrainConfig, evaluate, fit, train_one_epoch
from .recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "PRESETS", "parse_grid", "run_ablation", "DataConfig", "DataNotFoundError", "SyntheticPatterns",
    "build_datasets", "FitResult", "TrainConfig", "evaluate", "fit", "train_one_epoch", "RECIPES", "Recipe",
    "get_recipe",
]
