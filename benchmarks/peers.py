"""The peers of the pipeline benchmarks: flashstep's pipelines' computation in diffusers + peft, as the
papers' code runs it, and ``torch.compile`` of that.

    osediff   OSEDiff_test.forward (cswry/OSEDiff): peft LoRA unmerged (adapters default_encoder /
              default_decoder / default_others on the UNet, default_encoder on the VAE encoder; the trained
              conv_in), posterior mean, the DDPM x̂0 step at t = 999, AdaIN colour fix
    s3diff    S3Diff.forward (ArcticHare105/S3Diff s3diff_tile.py): DEResNet scores -> per-block r×r matrices
              set on every LoRA layer for this image (``de_mod``), peft layers running S3Diff's
              ``my_lora_fwd`` (A x, then the einsum with de_mod, then B), the UNet once per prompt, guidance
              1.07, wavelet colour fix
    sd-turbo  diffusers' EulerDiscreteScheduler ("trailing", one step) around the UNet, VAE decode
    rrdbnet   spandrel's RRDBNet (ESRGAN) on the same state dict

Every peer shares the case's weights (no copy) except where noted, is called under ``torch.inference_mode``
(by :func:`flashstep.bench.measure`) and returns the image (B, 3, H, W) in [0, 1] on the CPU, like flashstep's pipelines. The math follows
flashstep's: the posterior mean (the papers sample it), and the upsampling and padding flashstep uses.
"""
from __future__ import annotations

import functools
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from flashstep.bench import S3DIFF_UNET_TARGETS, S3DIFF_VAE_TARGETS, Case

# The paper-code pieces that the pipeline tests check flashstep against are the peers' pieces too: S3Diff's
# degradation net and LoRA forward, and the colour fixes of OSEDiff and S3Diff.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "pipelines"))
from reference import DEResNet, adain_color_fix, my_lora_fwd, wavelet_color_fix  # noqa: E402

LAST_STEP = 999
GUIDANCE_SCALE = 1.07
PAD_MULTIPLE = 64


@dataclass
class Variant:
    """One peer: ``build()`` makes its models and call, ``call()`` runs one image, ``release()`` frees it."""

    name: str
    factory: Callable[[], Callable[[], torch.Tensor]]
    skip: Optional[str] = None
    note: str = ""

    def build(self) -> None:
        self._call = self.factory()

    def call(self) -> torch.Tensor:
        return self._call()

    def release(self) -> None:
        self._call = None


def compile_unavailable_reason(case: Case) -> Optional[str]:
    from torch._dynamo import is_dynamo_supported

    if not is_dynamo_supported():
        return "torch.compile does not support this Python or platform"
    if case.device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler and none is on PATH"
    return None


def variants(case: Case, compile_peers: bool = True) -> List[Variant]:
    """The peers of ``case``, the paper's form first (its output is the reference of the others)."""
    quiet_diffusers()
    builders = {"osediff": _osediff, "s3diff": _s3diff, "sd-turbo": _sd_turbo, "rrdbnet": _rrdbnet}
    found = builders[case.pipeline](case)
    if not compile_peers:
        return [v for v in found if not v.name.startswith("torch.compile")]
    reason = compile_unavailable_reason(case)
    if reason:
        for variant in found:
            if variant.name.startswith("torch.compile"):
                variant.skip = reason
    return found


def compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of ``fn`` with static shapes and a fresh dynamo cache."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# -- diffusers models on the case's weights ------------------------------------------------------------
def quiet_diffusers() -> None:
    """diffusers warns on every ``.to(dtype)`` of a model built without ``from_pretrained``; the peers do that."""
    from diffusers.utils import logging

    logging.set_verbosity_error()


def diffusers_unet(config, state: Dict[str, torch.Tensor]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config.to_diffusers())
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def diffusers_vae(config, state: Dict[str, torch.Tensor]) -> nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**config.to_diffusers())
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def add_peft_lora(model: nn.Module, spec, adapter_groups: Dict[str, List[str]]) -> None:
    """peft adapters named as the paper names them, each over its module paths, with the spec's A and B.

    peft's LoraConfig(r) without lora_alpha gives scale 8 / r, the spec's scale."""
    from peft import LoraConfig

    for adapter, paths in adapter_groups.items():
        rank = spec.modules[paths[0]].down.shape[0]
        model.add_adapter(LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=list(paths)),
                          adapter_name=adapter)
        for path in paths:
            layer, weights = model.get_submodule(path), spec.modules[path]
            if not math.isclose(layer.scaling[adapter], weights.scale):
                raise AssertionError(f"{path}: peft scale {layer.scaling[adapter]} != the spec's {weights.scale}")
            down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            with torch.no_grad():
                down.copy_(weights.down.reshape(down.shape))
                up.copy_(weights.up.reshape(up.shape))
    model.set_adapter(list(adapter_groups))


def on_device(case: Case, model: nn.Module) -> nn.Module:
    return model.to(case.device, case.dtype)


@functools.lru_cache(maxsize=None)
def alpha_bar(t: int = LAST_STEP) -> float:
    """ᾱ_t of SD's scaled_linear schedule, from diffusers' DDPMScheduler."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return float(scheduler.alphas_cumprod[t])


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    pad_h, pad_w = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x


# -- OSEDiff ------------------------------------------------------------------------------------------
def osediff_forward(unet: nn.Module, vae: nn.Module, lq: torch.Tensor, context: torch.Tensor, size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """OSEDiff_test.forward: lq (B, 3, h, w) in [0, 1] on the models' device, context (B, 77, 1024) -> the image
    (B, 3, size, size) in [0, 1] on the CPU. x̂0 = (z − √(1−ᾱ)·ε)/√ᾱ at t = 999, decode, AdaIN."""
    a = alpha_bar()
    scaling = vae.config.scaling_factor
    lq_up = F.interpolate(lq, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    height, width = lq_up.shape[-2:]
    x = pad_to_multiple(lq_up * 2 - 1).to(dtype)
    z = vae.encode(x).latent_dist.mode() * scaling
    eps = unet(z, LAST_STEP, encoder_hidden_states=context).sample
    x0 = ((z.float() - math.sqrt(1 - a) * eps.float()) / math.sqrt(a)).to(dtype)
    image = vae.decode(x0 / scaling).sample.float().clamp(-1, 1) * 0.5 + 0.5
    return adain_color_fix(image[..., :height, :width], lq_up).cpu()


def osediff_reference(case: Case, unet: nn.Module, vae: nn.Module) -> Callable[[], torch.Tensor]:
    lq, context = case.inputs["lq"], case.inputs["context"]
    return lambda: osediff_forward(unet, vae, lq.to(case.device), context, case.size, case.dtype)


def _osediff_groups(paths: List[str], component: str) -> Dict[str, List[str]]:
    if component == "vae":
        return {"default_encoder": paths}
    groups = {"default_encoder": [], "default_decoder": [], "default_others": []}
    for path in paths:
        if path.startswith("down_blocks") or path == "conv_in":
            groups["default_encoder"].append(path)
        elif path.startswith("up_blocks") or path == "conv_out":
            groups["default_decoder"].append(path)
        else:
            groups["default_others"].append(path)
    return groups


def _osediff_unmerged(case: Case):
    unet_state = dict(case.base_state["unet"], **case.lora["unet_weights"])
    unet = diffusers_unet(case.models["unet"].config, unet_state)
    vae = diffusers_vae(case.models["vae"].config, case.base_state["vae"])
    add_peft_lora(unet, case.lora["unet"], _osediff_groups(list(case.lora["unet"].modules), "unet"))
    add_peft_lora(vae, case.lora["vae"], _osediff_groups(list(case.lora["vae"].modules), "vae"))
    return on_device(case, unet), on_device(case, vae)


def _osediff(case: Case) -> List[Variant]:
    def unmerged():
        return osediff_reference(case, *_osediff_unmerged(case))

    def merged():
        unet = diffusers_unet(case.models["unet"].config, case.models["unet"].state_dict())
        vae = diffusers_vae(case.models["vae"].config, case.models["vae"].state_dict())
        return osediff_reference(case, unet, vae)

    return [
        Variant("diffusers+peft (LoRA unmerged)", unmerged),
        Variant("diffusers (LoRA merged)", merged, note="shares flashstep's merged weights"),
        Variant("torch.compile(diffusers+peft)", lambda: compiled(unmerged())),
    ]


# -- S3Diff -------------------------------------------------------------------------------------------
def _bind_my_lora_fwd(model: nn.Module) -> List[str]:
    """Give every peft LoRA layer S3Diff's forward, as S3Diff.__init__ does; returns their paths."""
    paths = [name[: -len(".base_layer")] for name, _ in model.named_modules() if name.endswith(".base_layer")]
    for path in paths:
        layer = model.get_submodule(path)
        layer.forward = my_lora_fwd.__get__(layer, layer.__class__)
    return paths


def s3diff_block(path: str, component: str) -> int:
    """S3Diff's block index of a LoRA layer: UNet down i -> i, mid 4, up i -> 5 + i, else 9; VAE encoder
    down i -> i, mid 4, else 5."""
    parts = path.split(".")
    if component == "vae":
        return int(parts[2]) if parts[1] == "down_blocks" else (4 if parts[1] == "mid_block" else 5)
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return 4
    if parts[0] == "up_blocks":
        return 5 + int(parts[1])
    return 9


class S3DiffModulation(nn.Module):
    """S3Diff.forward's degradation embedding: Fourier features of the scores, de/block/fuse MLPs."""

    def __init__(self, state: Dict[str, torch.Tensor], rank_unet: int, rank_vae: int):
        super().__init__()
        self.ranks = {"unet": rank_unet, "vae": rank_vae}
        self.register_buffer("W", state["w"].float())
        for branch, blocks in (("unet", 10), ("vae", 6)):
            rank = self.ranks[branch]
            setattr(self, f"{branch}_de_mlp", nn.Sequential(nn.Linear(256, 256), nn.ReLU(True)))
            setattr(self, f"{branch}_block_mlp", nn.Sequential(nn.Linear(64, 64), nn.ReLU(True)))
            setattr(self, f"{branch}_fuse_mlp", nn.Linear(256 + 64, rank * rank))
            setattr(self, f"{branch}_block_embeddings", nn.Embedding(blocks, 64))
        renamed = {}
        for key, value in state.items():
            if key == "w":
                continue
            branch, rest = key.split(".", 1)
            renamed[f"{branch}_{rest}"] = value.float()
        self.load_state_dict(dict(renamed, W=self.W), strict=True)

    def forward(self, scores: torch.Tensor):
        projected = scores[..., None] * self.W[None, None, :] * 2 * math.pi
        projected = torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)
        projected = torch.cat([projected[:, 0], projected[:, 1]], dim=-1)
        out = {}
        for branch in ("unet", "vae"):
            de = getattr(self, f"{branch}_de_mlp")(projected)
            block = getattr(self, f"{branch}_block_mlp")(getattr(self, f"{branch}_block_embeddings").weight)
            fused = getattr(self, f"{branch}_fuse_mlp")(torch.cat(
                [de.unsqueeze(1).repeat(1, block.shape[0], 1), block.unsqueeze(0).repeat(de.shape[0], 1, 1)], -1))
            out[branch] = fused.reshape(fused.shape[0], fused.shape[1], self.ranks[branch], self.ranks[branch])
        return out


def _s3diff_models(case: Case):
    unet = diffusers_unet(case.models["unet"].config, case.base_state["unet"])
    vae = diffusers_vae(case.models["vae"].config, case.base_state["vae"])
    from peft import LoraConfig

    specs = {"unet": case.lora["unet"], "vae": case.lora["vae"]}
    # S3Diff.__init__: the VAE adapter "vae_skip" from the encoder regex, the UNet adapter "default" from the
    # suffix list, each with peft's default alpha.
    vae.add_adapter(LoraConfig(r=next(iter(specs["vae"].modules.values())).down.shape[0], init_lora_weights="gaussian",
                               target_modules=S3DIFF_VAE_TARGETS), adapter_name="vae_skip")
    unet.add_adapter(LoraConfig(r=next(iter(specs["unet"].modules.values())).down.shape[0],
                                init_lora_weights="gaussian", target_modules=list(S3DIFF_UNET_TARGETS)))
    layers = {}
    for component, model, adapter in (("unet", unet, "default"), ("vae", vae, "vae_skip")):
        paths = _bind_my_lora_fwd(model)
        if sorted(paths) != sorted(specs[component].modules):
            raise AssertionError(f"peft wrapped {len(paths)} {component} layers, the case has "
                                 f"{len(specs[component].modules)} LoRAs")
        for path in paths:
            layer, weights = model.get_submodule(path), specs[component].modules[path]
            with torch.no_grad():
                layer.lora_A[adapter].weight.copy_(weights.down.reshape(layer.lora_A[adapter].weight.shape))
                layer.lora_B[adapter].weight.copy_(weights.up.reshape(layer.lora_B[adapter].weight.shape))
        layers[component] = [(model.get_submodule(path), s3diff_block(path, component)) for path in paths]
    de_net = DEResNet()
    de_net.load_state_dict({k: v.float() for k, v in case.models["de_net"].state_dict().items()}, strict=True)
    modulation = S3DiffModulation(case.models["modulation"].state_dict(), case.models["modulation"].unet.rank,
                                  case.models["modulation"].vae.rank)
    return (on_device(case, unet), on_device(case, vae), de_net.to(case.device, case.dtype).eval(),
            modulation.to(case.device).eval(), layers)


def s3diff_reference(case: Case, unet, vae, de_net, modulation, layers) -> Callable[[], torch.Tensor]:
    """S3Diff.forward on the case's input (see the module docstring)."""
    a = alpha_bar()
    scaling = vae.config.scaling_factor
    lq, positive, negative = case.inputs["lq"], case.inputs["context"], case.inputs["negative_context"]

    def forward() -> torch.Tensor:
        lq_dev = lq.to(case.device)
        lq_up = F.interpolate(lq_dev, size=(case.size, case.size), mode="bilinear", align_corners=True).clamp(0, 1)
        height, width = lq_up.shape[-2:]
        x = pad_to_multiple(lq_up * 2 - 1).to(case.dtype)
        mixes = modulation(de_net(lq_dev.to(case.dtype)).float())
        for component in ("unet", "vae"):
            for layer, block in layers[component]:
                layer.de_mod = mixes[component][:, block].to(case.dtype)
        z = vae.encode(x).latent_dist.mode() * scaling
        eps_positive = unet(z, LAST_STEP, encoder_hidden_states=positive).sample.float()
        eps_negative = unet(z, LAST_STEP, encoder_hidden_states=negative).sample.float()
        eps = eps_negative + GUIDANCE_SCALE * (eps_positive - eps_negative)
        x0 = ((z.float() - math.sqrt(1 - a) * eps) / math.sqrt(a)).to(case.dtype)
        image = vae.decode(x0 / scaling).sample.float().clamp(-1, 1) * 0.5 + 0.5
        return wavelet_color_fix(image[..., :height, :width], lq_up).cpu()

    return forward


def _s3diff(case: Case) -> List[Variant]:
    def eager():
        return s3diff_reference(case, *_s3diff_models(case))

    return [
        Variant("diffusers+peft (per-image LoRA)", eager, note="S3Diff's my_lora_fwd; de_mod set per image"),
        Variant("torch.compile(diffusers+peft)", lambda: compiled(eager())),
    ]


# -- SD-Turbo -----------------------------------------------------------------------------------------
def sd_turbo_reference(case: Case, unet, vae) -> Callable[[], torch.Tensor]:
    """One Euler step as StableDiffusionPipeline runs SD-Turbo (num_inference_steps=1, guidance 0)."""
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing", steps_offset=1)
    noise, context = case.inputs["noise"], case.inputs["context"]
    scaling = vae.config.scaling_factor

    def forward() -> torch.Tensor:
        scheduler.set_timesteps(1, device=case.device)
        latents = noise.to(case.device, torch.float32) * scheduler.init_noise_sigma
        t = scheduler.timesteps[0]
        eps = unet(scheduler.scale_model_input(latents, t).to(case.dtype), t, encoder_hidden_states=context).sample
        latents = scheduler.step(eps.float(), t, latents).prev_sample.to(case.dtype)
        image = vae.decode(latents / scaling).sample
        return (image.float().clamp(-1, 1) * 0.5 + 0.5).cpu()

    return forward


def _sd_turbo(case: Case) -> List[Variant]:
    def models():
        return (diffusers_unet(case.models["unet"].config, case.base_state["unet"]),
                diffusers_vae(case.models["vae"].config, case.base_state["vae"]))

    return [
        Variant("diffusers", lambda: sd_turbo_reference(case, *models())),
        Variant("torch.compile(diffusers)", lambda: compiled(sd_turbo_reference(case, *models()))),
    ]


# -- RRDBNet ------------------------------------------------------------------------------------------
def _spandrel_rrdbnet(case: Case) -> nn.Module:
    from spandrel import ModelLoader

    descriptor = ModelLoader().load_from_state_dict({k: v.float().cpu() for k, v in case.base_state["net"].items()})
    return descriptor.model.eval().requires_grad_(False).to(case.device, case.dtype)


def rrdbnet_reference(case: Case, net: nn.Module) -> Callable[[], torch.Tensor]:
    lq = case.inputs["lq"]

    def forward() -> torch.Tensor:
        return net(lq.to(case.device, case.dtype)).float().clamp(0, 1).cpu()

    return forward


def _rrdbnet(case: Case) -> List[Variant]:
    return [
        Variant("spandrel", lambda: rrdbnet_reference(case, _spandrel_rrdbnet(case)), note="its own copy of the weights"),
        Variant("torch.compile(spandrel)", lambda: compiled(rrdbnet_reference(case, _spandrel_rrdbnet(case)))),
    ]


# -- what the bench_<pipeline>.py files share ---------------------------------------------------------
# ‖out − ref‖ / ‖ref‖ allowed against the paper's form: fp32 lands near 1e-5, half precision near 1e-2 (the
# same one-step math through a 0.9 B-parameter UNet and the VAE); a wrong pipeline lands near 1.
RELATIVE_ERROR_LIMIT = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
REPEATS = {"cpu": 3, "cuda": 5}


@dataclass(frozen=True)
class BenchCase:
    """One case of a bench file: the output side, the model config, flashstep's memory budget, the error
    allowed against the paper's form (default: :data:`RELATIVE_ERROR_LIMIT`), whether the CI run
    (``--benchmark-disable``) leaves the case or its torch.compile peer to timed runs (and why), and the timed
    calls per variant (default: :data:`REPEATS`)."""

    size: int
    config: str = "full"
    max_memory: Optional[str] = None
    error_limit: Optional[float] = None
    ci_skip: str = ""
    compile_ci_skip: str = ""
    repeats: Optional[int] = None

    def __str__(self) -> str:
        budget = f"-budget{self.max_memory}" if self.max_memory else ""
        return f"{self.size}px-{self.config}{budget}"


def pipeline_runner(pipeline: str, spec: BenchCase, request):
    """A module fixture's body: yields (the case's :class:`~flashstep.bench.CaseRunner`, ``spec``) and frees
    the case after the module."""
    import gc

    import pytest

    from flashstep.bench import CaseRunner, build_case

    disabled = request.config.getoption("benchmark_disable")
    if disabled and spec.ci_skip:
        pytest.skip(f"timed runs only: {spec.ci_skip}")
    case = build_case(pipeline, spec.size, config=spec.config, max_memory=spec.max_memory)
    runner = CaseRunner(case, compile_peers=not (disabled and spec.compile_ci_skip))
    if disabled and spec.compile_ci_skip:
        for name in ("torch.compile(diffusers+peft)", "torch.compile(diffusers)", "torch.compile(spandrel)"):
            runner.skipped[name] = f"timed runs only: {spec.compile_ci_skip}"
    yield runner, spec
    del runner, case
    gc.collect()


def benchmark_variant(runner_and_spec, name: str, benchmark, request, session) -> None:
    """Time (or, with --benchmark-disable, run once) one variant of the runner's case, record it in
    ``benchmark.extra_info`` in conftest.py's conventions plus ``peak_mb``, ``held_mb``, ``cpu_s``, and check
    its output against the paper's form."""
    import pytest

    runner, spec = runner_and_spec
    session.check_budget(request.node.path)
    reason = runner.skip_reason(name)
    if reason:
        pytest.skip(reason)
    case = runner.case
    benchmark.group = f"{case.pipeline} {spec}"
    info = benchmark.extra_info
    info.update(op=case.pipeline, backend=name, case=str(spec), dtype=str(case.dtype).replace("torch.", ""),
                device=session.device_name, commit=session.commit,
                shape={"output": case.size, "input": case.input_size, "config": case.config,
                       "max_memory": case.max_memory})
    if benchmark.disabled:
        error = benchmark.pedantic(runner.run_once, args=(name,))
    else:
        row = runner.measure(name, spec.repeats or REPEATS[case.device.type],
                             loop=lambda fn, rounds: benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0))
        error = row.relative_error
        info.update(median_ms=row.median_s * 1e3, rounds=len(row.runs_s), cpu_s=row.cpu_s,
                    peak_mb=row.peak_bytes / 2**20, held_mb=row.held_bytes / 2**20, warmup_s=row.first_call_s)
    if error is not None:
        info["relative_error"] = error
        limit = spec.error_limit or RELATIVE_ERROR_LIMIT[case.dtype]
        assert error <= limit, f"{name}: ‖out − ref‖/‖ref‖ = {error:.3g} against the paper's form exceeds {limit:g}"
