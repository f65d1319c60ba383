"""Shared helpers of the model parity tests: random reference models in the real key layouts, our models
loaded from their state dicts, and the two tolerance rules.

References are built on the meta device and filled with seeded random values (much faster than the
libraries' own init for the 0.1-2.6 B-parameter full configs); our models are built on the meta device too
and take the reference's tensors with ``load_state_dict(strict=True, assign=True)``, so a full config is
held in memory once.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Dict

import pytest
import torch
from torch import nn

from flashstep.testing import assert_error_within_torch, max_error, randomize_

# fp32 rule of the model tests: max |ours - reference| <= FP32_RANGE_FRACTION · (max - min of the reference).
FP32_RANGE_FRACTION = 1e-4


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module.

    NOTE: on the shared 2-core test machine the small-config UNet tests took 16 s of CPU (53 s wall) with
    one thread and 71 s (216 s wall) with two, whose OpenMP workers spin while waiting for a core; the
    full SD1.5 config at an 8×8 latent was faster with one thread too (18 s vs 23 s of CPU).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def _reset_buffers_(module: nn.Module) -> None:
    """Refill the buffers ``to_empty`` left uninitialised (transformers CLIP's position_ids)."""
    for name, buffer in module.named_buffers():
        if not name.endswith("position_ids"):
            raise AssertionError(f"reference buffer {name} has no known initial value")
        buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))


def random_reference(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """The library model ``factory()`` builds, with seeded random weights, in eval mode, without grads."""
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device="cpu")
    _reset_buffers_(model)
    return randomize_(model, seed).eval().requires_grad_(False)


def cast_copy(factory: Callable[[], nn.Module], state: Dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """``factory()`` holding ``state`` cast to ``dtype`` (no fp32 copy is made on the way)."""
    with torch.device("meta"):
        model = factory()
    # NOTE: to_empty only reserves memory (the parameters are replaced below); it gives buffers a home.
    model = model.to_empty(device="cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    _reset_buffers_(model)
    return model.eval().requires_grad_(False)


def ours_sharing(factory: Callable[[], nn.Module], state: Dict[str, torch.Tensor]) -> nn.Module:
    """Our model built on the meta device, holding the reference's tensors (strict key match)."""
    with torch.device("meta"):
        model = factory()
    model.load_state_dict(state, strict=True, assign=True)
    return model


def assert_fp32_parity(ours: torch.Tensor, reference: torch.Tensor, label: str) -> None:
    assert ours.shape == reference.shape, f"{label}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    assert ours.dtype == torch.float32, f"{label}: dtype {ours.dtype}"
    value_range = (reference.max() - reference.min()).item()
    error = max_error(ours, reference)
    assert error <= FP32_RANGE_FRACTION * value_range, (
        f"{label}: max error {error:.3g} exceeds {FP32_RANGE_FRACTION:g} x the output range {value_range:.3g}"
    )


def assert_low_precision_parity(ours: torch.Tensor, reference32: torch.Tensor, reference_low: torch.Tensor,
                                label: str) -> None:
    """Our low-precision error vs the fp32 reference <= 2x the reference library's own error in that dtype."""
    assert ours.dtype == reference_low.dtype, f"{label}: dtype {ours.dtype} != {reference_low.dtype}"
    assert_error_within_torch(ours, reference32, reference_low, label=label)



@pytest.fixture(scope="session")
def parity():
    """The helpers above, for the test modules (a conftest is not imported by name)."""
    return SimpleNamespace(
        randomize_=randomize_,
        random_reference=random_reference,
        cast_copy=cast_copy,
        ours_sharing=ours_sharing,
        assert_fp32_parity=assert_fp32_parity,
        assert_low_precision_parity=assert_low_precision_parity,
    )
