"""cspmirror: the CSPMirrorNet backbone, a pure-PyTorch reference and fused kernels.

``import cspmirror`` needs only torch: Triton and the C++/CUDA extension load lazily, on first use.
"""

from . import (
    _checkout,  # noqa: F401  (first: makes cspmirror.kernels importable from a checkout)
    ops,
)
from .accelerate import accelerate
from .backends import BackendUnavailableError, all_statuses
from .checkpoint import load_checkpoint
from .fuse import fold_bn, fuse_for_inference, set_backend, set_recompute
from .layers import (
    BatchNormMish2d,
    ConvBNMish,
    CSPMirrorStage,
    MirrorFuse,
    MirrorSplit,
    MishedDenseBlock,
)
from .models import (
    CSPMirrorNet,
    CSPMirrorNetConfig,
    StageConfig,
    cspmirrornet53,
    cspmirrornet_s,
    cspmirrornet_tiny,
    get_model,
    list_models,
)

__version__ = "0.1.0"

__all__ = [
    "ops", "accelerate", "BackendUnavailableError", "all_statuses", "load_checkpoint", "fold_bn",
    "fuse_for_inference", "set_backend", "set_recompute", "BatchNormMish2d", "ConvBNMish", "CSPMirrorStage",
    "MirrorFuse", "MirrorSplit", "MishedDenseBlock", "CSPMirrorNet", "CSPMirrorNetConfig", "StageConfig",
    "cspmirrornet53", "cspmirrornet_s", "cspmirrornet_tiny", "get_model", "list_models", "__version__",
]
