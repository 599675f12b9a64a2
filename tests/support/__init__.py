"""Helpers shared by the tests, imported as ``support.<module>`` (pytest.ini puts tests/ on the path).

``devices``: where tests run (and the Triton interpreter without a GPU); ``asserts``: bit-for-bit
comparisons; ``backends``: the backends under test and the one parametrization over them;
``cases``: inputs and the spec-model check; ``spec_model``: the independent NumPy model of the
spec; ``hf_models``: tiny Hugging Face models. Importing this package itself has no side effects.
"""

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
