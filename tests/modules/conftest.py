import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # The models here are tiny: a second intra-op thread only adds synchronisation, and on a busy 2-core machine
    # spinning threads made a training step 50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
