"""Fixtures and hooks only: the shared helpers are the ``support`` package (tests/support/)."""

# support first: without a GPU it sets TRITON_INTERPRET=1 before triton is imported (support/__init__.py).
from support.backends import backend_id, targets, why_not


def pytest_report_header(config):
    """Which backends run here, on which device, and why the others are skipped."""
    described = [backend_id(*target) + (f" (skipped: {why_not(*target)})" if why_not(*target) else "")
                 for target in targets()]
    return "backends: " + ", ".join(described)
