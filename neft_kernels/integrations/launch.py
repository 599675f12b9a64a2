"""Run a training program with transformers' ``neftune_noise_alpha`` served by neft_kernels, without
changing its code::

    python -m neft_kernels.integrations.launch [--length-mode ...] -m axolotl.cli.train config.yml
    python -m neft_kernels.integrations.launch [--length-mode ...] train.py --its-own args
    torchrun --nproc-per-node 8 -m neft_kernels.integrations.launch -m axolotl.cli.train config.yml

Our options come first; ``-m MODULE`` or a script path ends them, and everything after it is the
program's (as with ``python``). The program then runs as ``__main__`` in this process, after
:func:`~neft_kernels.integrations.replace_trainer_neftune`. Worker processes that a program starts
itself run without it: start those under ``torchrun`` with this module instead.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .. import backends
from ..lengths import LENGTH_MODES
from ..options import NOISE_TOKENS
from ..spec import DISTRIBUTIONS
from .trainer_neftune import replace_trainer_neftune

_FLAGS = {"--length-mode": LENGTH_MODES, "--distribution": DISTRIBUTIONS, "--noise-tokens": NOISE_TOKENS,
          "--backend": backends.NAMES}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m neft_kernels.integrations.launch",
        usage="%(prog)s [options] (-m MODULE | SCRIPT) [program arguments ...]",
        description="Run a program (as python would) with TrainingArguments.neftune_noise_alpha served by "
                    "neft_kernels' fused, per-sequence NEFTune instead of transformers' forward hook.")
    for flag, choices in _FLAGS.items():
        parser.add_argument(flag, choices=choices, default=None, help="a NoiseOptions field (default: its default)")
    return parser


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options, then the program: from ``-m`` or the first argument that is not one of ours."""
    i = 0
    while i < len(argv) and argv[i] != "-m" and argv[i].startswith("-"):
        i += 2 if argv[i] in _FLAGS else 1  # --flag value, --flag=value, -h
    return argv[:i], argv[i:]


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    ours, program = _split(sys.argv[1:] if argv is None else argv)
    options = {name: value for name, value in vars(parser.parse_args(ours)).items() if value is not None}
    if not program or program[0] == "-m" and len(program) < 2:
        parser.error("give the program: -m MODULE or SCRIPT, then its arguments")
    replace_trainer_neftune(**options)
    if program[0] == "-m":
        sys.argv = program[1:]  # runpy puts the module's path in argv[0], as python -m does
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        sys.path[0] = os.path.dirname(os.path.abspath(program[0]))  # as `python SCRIPT` would
        runpy.run_path(program[0], run_name="__main__")


if __name__ == "__main__":
    main()
