"""peft as the reference for LoRA weights: randomised adapters, peft's own merge, and the check that a
LoRASpec merges to the same weights."""
from __future__ import annotations

import copy

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from flashstep.ops.lora import LoRA, merge_lora


def randomise_lora(model, seed=11):
    """Every LoRA A and B ~ N(0, 0.1²): peft's "gaussian" init leaves B at zero, which would hide errors."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def _peft_merged(model):
    """{module path: merged weight} by peft's own merge, on a copy of the model."""
    merged = copy.deepcopy(model)
    out = {}
    for name, module in merged.named_modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
            out[name] = module.get_base_layer().weight.detach().clone()
    return out


def _base_weights(model):
    return {name: module.get_base_layer().weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)}


def check_spec_merges_like_peft(spec, model, name_of=lambda path: path):
    """Every peft-wrapped module has an adapter in the spec, and W + scale·B·A equals peft's merge."""
    merged, base = _peft_merged(model), _base_weights(model)
    assert {name_of(path) for path in merged} == set(spec.modules)
    for path, expected in merged.items():
        weights = spec.modules[name_of(path)]
        ours = merge_lora(base[path], LoRA(weights.down, weights.up, weights.scale))
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6, msg=path)
