"""Tolerances and comparisons shared by the tests and the benchmarks.

Two rules (DESIGN.md):

* Short ops (shuffles, elementwise epilogues): a fixed per-dtype (atol, rtol) table,
  :data:`TOLERANCES`, checked by :func:`assert_close`.
* Long reductions (attention, convolution, GEMM, GroupNorm over large groups): the kernel's error
  against the fp32 reference may be at most twice the error of torch computing the same thing in the
  same low precision, plus a floor of a few units in the last place of the output's dtype at the
  output's scale (:func:`assert_error_within_torch`). This is FlashAttention's rule: it adapts to
  shapes whose rounding error grows with the reduction length.

Mismatches are reported with their count, the worst index, and the values there.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# (atol, rtol) per dtype for short ops; fp16/bf16 allow one rounding of the output (2^-11, 2^-8).
TOLERANCES = {
    torch.float32: (1e-5, 1.3e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

# Floor of the long-reduction rule, in units of the dtype's machine epsilon times max|reference|.
ULP_FLOOR = 4.0


def _describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, label: str) -> str:
    diff = (actual.double() - expected.double()).abs()
    count = int(bad.sum())
    flat_index = int(torch.argmax(torch.where(bad, diff, torch.zeros_like(diff))))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), actual.shape))
    nan_note = ""
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    if nan_mismatch.any():
        nan_note = f"; NaN where the reference has none (or the reverse) at {int(nan_mismatch.sum())} elements"
    return (
        f"{label}: {count} of {actual.numel()} elements differ; worst at {index}: "
        f"got {actual[index].item():.6g}, expected {expected[index].item():.6g} "
        f"(|diff| {diff[index].item():.3g}, max |expected| {expected.abs().max().item():.3g}){nan_note}"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    label: str = "output",
) -> None:
    """|actual - expected| <= atol + rtol·|expected| everywhere (defaults from :data:`TOLERANCES`)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    default_atol, default_rtol = TOLERANCES[actual.dtype] if actual.dtype in TOLERANCES else TOLERANCES[torch.float32]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    bad = (a - e).abs() > atol + rtol * e.abs()
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        raise AssertionError(_describe_mismatch(a, e, bad, label))


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.detach().cpu().double() - reference.detach().cpu().double()).abs().max().item()


def error_budget(reference: torch.Tensor, torch_low_precision: torch.Tensor, dtype: torch.dtype, factor: float = 2.0) -> float:
    """factor × torch's own error in ``dtype``, plus the ULP floor at the output's scale."""
    scale = max(1.0, reference.detach().abs().max().item())
    floor = ULP_FLOOR * torch.finfo(dtype).eps * scale
    return factor * max_error(torch_low_precision, reference) + floor


def assert_error_within_torch(
    actual: torch.Tensor,
    reference: torch.Tensor,
    torch_low_precision: torch.Tensor,
    *,
    factor: float = 2.0,
    label: str = "output",
) -> Tuple[float, float]:
    """The long-reduction rule; returns (our error, the budget) for reporting."""
    if actual.shape != reference.shape:
        raise AssertionError(f"{label}: shape {tuple(actual.shape)} != expected {tuple(reference.shape)}")
    if torch.isnan(actual).any() and not torch.isnan(reference).any():
        raise AssertionError(f"{label}: {int(torch.isnan(actual).sum())} NaN in the output, none in the reference")
    ours = max_error(actual, reference)
    budget = error_budget(reference, torch_low_precision, actual.dtype, factor)
    if not ours <= budget:
        a, e = actual.detach().cpu().double(), reference.detach().cpu().double()
        bad = (a - e).abs() > budget
        raise AssertionError(
            f"{label}: max error {ours:.4g} exceeds {factor}x torch's {actual.dtype} error + floor = {budget:.4g}; "
            + _describe_mismatch(a, e, bad, label)
        )
    return ours, budget



def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random parameters that keep activations O(1): matrices and kernels U(±√(3/fan_in)) (unit-variance
    preserving), norm scales N(1, 0.1²), biases N(0, 0.1²). Norm weights are randomized too, so a swapped key
    cannot pass a parity test. Drawn on the module's device, in place; returns the module."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                bound = math.sqrt(3.0 / param[0].numel())
                param.uniform_(-bound, bound, generator=generator)
            elif name.endswith("weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.1, generator=generator)
    return module

def random_tensor(shape, dtype=torch.float32, device="cpu", *, scale: float = 1.0, generator=None) -> torch.Tensor:
    """Normal random values (never zeros: they hide unwritten outputs)."""
    return (torch.randn(shape, generator=generator, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as x in a strided view (every other element of a doubled last dim)."""
    doubled = torch.empty(x.shape[:-1] + (x.shape[-1] * 2,), dtype=x.dtype, device=x.device)
    doubled[..., ::2] = x
    doubled[..., 1::2] = float("nan")
    return doubled[..., ::2]


def backends_to_test(op_name: str):
    """Every registered backend of an op except the reference, for parametrizing tests."""
    from . import registry

    return [b for b in registry.get(op_name).registered() if b != "torch"]


def require_backend(op_name: str, backend: str, device) -> None:
    """Skip the calling test unless ``backend`` runs here on ``device``."""
    import pytest

    from . import registry

    op = registry.get(op_name)
    if backend not in op.backends():
        pytest.skip(f"{backend} does not run here: {op.implementations[backend].unavailable_reason()}")
    if backend == "cuda" and str(device) == "cpu":
        pytest.skip("the cuda backend needs a CUDA device")


# OSEDiff's initialize_unet / initialize_vae (cswry/OSEDiff osediff.py; pipelines.md §1.4): a weight whose name
# contains one of these patterns gets a LoRA.
OSEDIFF_UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                         "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
OSEDIFF_VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v",
                        "to_out.0")


def osediff_unet_modules(unet: torch.nn.Module):
    """OSEDiff's ``initialize_unet`` module lists, by parameter-name patterns: (encoder, decoder, others), each a
    list of module paths (down blocks and conv_in; up blocks and conv_out; the rest)."""
    encoder, decoder, others = [], [], []
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in OSEDIFF_UNET_PATTERNS:
            if pattern in name and ("down_blocks" in name or "conv_in" in name):
                encoder.append(name.replace(".weight", ""))
                break
            elif pattern in name and ("up_blocks" in name or "conv_out" in name):
                decoder.append(name.replace(".weight", ""))
                break
            elif pattern in name:
                others.append(name.replace(".weight", ""))
                break
    return encoder, decoder, others


def osediff_vae_modules(vae: torch.nn.Module):
    """OSEDiff's ``initialize_vae`` module list: the encoder's convs and attention projections, and quant_conv
    (a path may repeat, as in the original loop)."""
    modules = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in OSEDIFF_VAE_PATTERNS:
            if pattern in name and "encoder" in name:
                modules.append(name.replace(".weight", ""))
            elif "quant_conv" in name and "post_quant_conv" not in name:
                modules.append(name.replace(".weight", ""))
    return modules
