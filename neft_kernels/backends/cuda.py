"""The CUDA C++ backend (``csrc/cuda``), ``auto``'s first choice on CUDA: same contract as ``cpu``, and
for the id check (``id_check.DeviceIdFlag``) ``read_back``, the native copy of its record, and
``bad_id_word``, the host int the forward sets where it records a bad id."""

from .. import _C_cuda  # type: ignore[attr-defined]  # a compiled extension: mypy reads no .so
from ._extension import check_abi, cuda_functions

check_abi(_C_cuda)
forward, backward, token_scales, forward_with_grad = cuda_functions(_C_cuda)
read_back = _C_cuda.read_back
bad_id_word = _C_cuda.bad_id_word
