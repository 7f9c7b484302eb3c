"""Triton device code for cspmirror, installed as ``cspmirror.kernels``.

Only ``@triton.jit`` functions and their launch helpers live here; the autograd Functions and op
registration are in ``cspmirror.ops``. Importing a kernel module imports triton: set
``TRITON_INTERPRET=1`` before that to run kernels on CPU tensors.
"""
