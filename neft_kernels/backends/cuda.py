"""The CUDA C++ backend (``csrc/cuda``), for machines without Triton: same contract as ``cpu``."""

from .. import _C_cuda
from ._extension import cuda_functions

forward, backward = cuda_functions(_C_cuda)
