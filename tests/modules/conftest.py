import pytest


@pytest.fixture(autouse=True)
def _every_test_on_one_thread(one_thread):
    """Every test of this folder runs on one torch thread (the ``one_thread`` fixture of tests/conftest.py)."""
