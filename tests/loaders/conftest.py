"""Fixtures of the loader tests; the reference models are in ``reference_models.py``."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """NOTE: the tensors here are small, so intra-op threads only add synchronisation: on the shared 2-core
    test machine two of these tests took 34 s of wall time with one thread and 59 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
