from .cspmirrornet import (
    MODEL_CONFIGS,
    CSPMirrorNet,
    CSPMirrorNetConfig,
    StageConfig,
    build_model,
    configure,
    cspmirrornet53,
    cspmirrornet_s,
    cspmirrornet_tiny,
)
from .registry import get_model, list_models, register_model

__all__ = [
    "MODEL_CONFIGS", "CSPMirrorNet", "CSPMirrorNetConfig", "StageConfig", "build_model", "configure",
    "cspmirrornet53", "cspmirrornet_s", "cspmirrornet_tiny", "get_model", "list_models", "register_model",
]
