"""Test tiers. The fast tier (``-m "not slow"``, the edit-test loop) runs each property-based test on a quarter
of its examples; the full suite (CI, the README's test command) on all of them. conftest.py sets FAST before the
test modules are collected."""

FAST = False


def examples(n: int) -> int:
    """Hypothesis ``max_examples`` for a test that asks for ``n`` in the full suite."""
    return max(3, n // 4) if FAST else n
