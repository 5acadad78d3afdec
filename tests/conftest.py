"""Fixtures shared by the test folders."""

import pytest
import torch

# Loaded only by the child processes of tests/test_network.py (as their sitecustomize), never collected.
collect_ignore = ["network_sim"]


@pytest.fixture
def one_thread():
    """Run a test on one torch intra-op thread (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    The models of the tests are tiny: a second thread only adds synchronisation, and on a busy 2-core machine
    spinning threads made a training step 50x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
