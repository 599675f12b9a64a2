"""The CUDA C++ backend (``csrc/cuda``), for machines without Triton: same contract as ``cpu``."""

from .. import _C_cuda
from ._extension import check_abi, cuda_functions

check_abi(_C_cuda)
forward, backward, token_scales = cuda_functions(_C_cuda)
