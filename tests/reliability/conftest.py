"""Fixtures of the reliability tests: the generated malformed corpus, one thread, the default pipeline."""
from __future__ import annotations

from typing import List

import pytest
import torch
from corpus import Case, checkpoint_corpus, image_corpus


@pytest.fixture(scope="session")
def image_cases(tmp_path_factory) -> List[Case]:
    return image_corpus(tmp_path_factory.mktemp("image_corpus"), mutations=12, seed=0)


@pytest.fixture(scope="session")
def checkpoint_cases(tmp_path_factory) -> List[Case]:
    root = tmp_path_factory.mktemp("checkpoint_corpus")
    return checkpoint_corpus(root / "files", root / "markers", mutations=24, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """NOTE: the images here are tiny; intra-op threads only add synchronisation on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def default_pipeline():
    import flashstep

    return flashstep.load("default", device="cpu")

