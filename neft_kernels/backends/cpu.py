"""The compiled CPU backend (``csrc/cpu``): fused forward, deterministic float32-accumulating backward."""

from .. import _C_cpu
from ._extension import backend_functions

forward, backward = backend_functions(_C_cpu)
