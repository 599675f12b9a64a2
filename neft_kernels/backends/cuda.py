"""The CUDA C++ backend (``csrc/cuda``), ``auto``'s first choice on CUDA: same contract as ``cpu``, and
``read_back``, the id check's native copy of its record (``id_check.DeviceIdFlag``)."""

from .. import _C_cuda
from ._extension import check_abi, cuda_functions

check_abi(_C_cuda)
forward, backward, token_scales, forward_with_grad = cuda_functions(_C_cuda)
read_back = _C_cuda.read_back
