"""Where there is no GPU, Triton runs its kernels in its CPU interpreter, for every test.

``triton.jit`` chooses interpreted or compiled functions when it decorates them, Triton's own
library functions (``tl.sum`` among them) included, so the variable is set here, before anything
imports Triton; tests/kernels/conftest.py reloads Berth's kernel modules if one came earlier.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
