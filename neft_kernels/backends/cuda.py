"""The CUDA C++ backend (``csrc/cuda``), for machines without Triton: same contract as ``cpu``."""

from .. import _C_cuda
from ._extension import backend_functions

forward, backward = backend_functions(_C_cuda)
