"""Run a training program with transformers' ``neftune_noise_alpha`` served by neft_kernels, without
changing its code::

    python -m neft_kernels.integrations.launch [--length-mode ...] -m axolotl.cli.train config.yml
    python -m neft_kernels.integrations.launch [--length-mode ...] train.py --its-own args
    torchrun --nproc-per-node 8 -m neft_kernels.integrations.launch -m axolotl.cli.train config.yml

Our options come first; ``-m MODULE`` or a script path ends them (or ``--``), and everything after
it is the program's, as with ``python``. The program then runs as ``__main__`` in this process, and
:func:`~neft_kernels.integrations.replace_trainer_neftune` takes effect when the program imports
``transformers.trainer`` (not before: whatever the program sets first, ``HF_HOME`` say, is set before
transformers reads it). Worker processes that a program starts itself run without it: start those
under ``torchrun`` with this module instead.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import zipfile
from typing import Callable

from .. import backends
from ..lengths import LENGTH_MODES
from ..options import NOISE_TOKENS, NoiseOptions
from ..spec import DISTRIBUTIONS
from .trainer_neftune import replace_trainer_neftune

_FLAGS = {"--length-mode": LENGTH_MODES, "--distribution": DISTRIBUTIONS, "--noise-tokens": NOISE_TOKENS,
          "--backend": backends.NAMES}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m neft_kernels.integrations.launch", allow_abbrev=False,  # _split knows whole flags only
        usage="%(prog)s [options] [--] (-m MODULE | SCRIPT) [program arguments ...]",
        description="Run a program (as python would) with TrainingArguments.neftune_noise_alpha served by "
                    "neft_kernels' fused, per-sequence NEFTune instead of transformers' forward hook.")
    defaults = NoiseOptions()
    for flag, choices in _FLAGS.items():
        field = flag.removeprefix("--").replace("-", "_")
        parser.add_argument(flag, choices=choices, default=None,
                            help=f"NoiseOptions.{field} (default: {getattr(defaults, field)})")
    return parser


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Our options, then the program: from ``-m``, ``--`` or the first argument that is not one of ours."""
    i = 0
    while i < len(argv) and argv[i] not in ("-m", "--") and argv[i].startswith("-"):
        i += 2 if argv[i] in _FLAGS else 1  # --flag value, --flag=value, -h
    return argv[:i], argv[i + 1:] if i < len(argv) and argv[i] == "--" else argv[i:]


class _AfterImport:
    """A one-shot import hook: runs ``then`` right after module ``name`` has been executed."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:  # what the import would ask next (not only the file system's finder)
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = getattr(spec.loader, "exec_module", None)
        if exec_module is None:
            raise ImportError(f"neft_kernels' launcher cannot hook the import of {fullname}: its loader "
                              f"{spec.loader!r} has no exec_module")

        def exec_then(module) -> None:
            exec_module(module)
            self.then()

        spec.loader.exec_module = exec_then  # this module's loader only
        return spec


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    ours, program = _split(sys.argv[1:] if argv is None else argv)
    options = {name: value for name, value in vars(parser.parse_args(ours)).items() if value is not None}
    if not program or program[0] == "-m" and len(program) < 2:
        parser.error("give the program: -m MODULE or SCRIPT, then its arguments")
    NoiseOptions.make(**options)  # refused before the program starts
    script = None if program[0] == "-m" else program[0]
    if script is not None and not os.path.exists(script):
        parser.exit(2, f"{parser.prog}: can't open file {os.path.abspath(script)!r}: no such file\n")

    def replace() -> None:
        replace_trainer_neftune(**options)

    if "transformers.trainer" in sys.modules:
        replace()
    else:
        sys.meta_path.insert(0, _AfterImport("transformers.trainer", replace))
    if script is None:
        sys.argv = program[1:]  # runpy puts the module's path in argv[0], as python -m does
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
        return
    sys.argv = program
    # sys.path[0] as `python SCRIPT` has it, in place of the working directory that -m put there: the
    # script's folder; a folder or zip archive itself (runpy puts it first); under -P nothing.
    if not getattr(sys.flags, "safe_path", False):  # Python 3.11+
        if os.path.isfile(script) and not zipfile.is_zipfile(script):
            sys.path[0] = os.path.dirname(os.path.realpath(script))
        else:
            del sys.path[0]
    runpy.run_path(os.path.abspath(script), run_name="__main__")


if __name__ == "__main__":
    main()
