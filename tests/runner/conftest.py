"""The streamed runs (VAE and UNet tiling) compute many small tiles: one torch thread for every test here."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # NOTE: on the shared 2-core machine every 2-thread op on a small tile waited ~100 ms at its OpenMP
    # barrier (a scheduler slice) against 0.3 ms with one thread; tiles are small ops by design.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
