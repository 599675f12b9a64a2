"""The compiled CPU backend (``csrc/cpu``): fused forward with scales and id check in C++, deterministic
float32-accumulating backward."""

from .. import _C_cpu
from ._extension import check_abi, cpu_functions

check_abi(_C_cpu)
forward, backward, token_scales, forward_with_grad = cpu_functions(_C_cpu)
draw_seed = _C_cpu.draw_seed
