"""Integrations with other libraries, each imported on demand (none is imported by ``import cspmirror``).

=====================================  =========================================================================
module                                 what
=====================================  =========================================================================
:mod:`cspmirror.integrations.fx`       torch.fx / torchvision feature extraction: leaf modules and functions
:mod:`cspmirror.integrations.timm`     the family in timm's registry (``timm.create_model("cspmirrornet53")``);
                                       needs the ``timm`` extra
:mod:`cspmirror.integrations.export`   ``torch.export``, ONNX export and an onnxruntime check of the fused model;
                                       ONNX needs the ``export`` extra
:mod:`cspmirror.integrations.ultralytics`  a YOLOv8 C2f-slot block from a CSPMirror stage's body and its yaml;
                                       needs the ``yolo`` extra
=====================================  =========================================================================
"""
