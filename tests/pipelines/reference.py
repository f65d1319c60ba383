"""The reference pipelines, written with diffusers, peft and transformers (never flashstep), the way the
original repositories run them; used only by the tests.

OSEDiff (cswry/OSEDiff ``osediff.py``, ``test_osediff.py``)::

    lq_up = bicubic ×s (clamped like Pillow's 8-bit resize);   x = 2·lq_up - 1
    z  = 0.18215 · E_LoRA(x).mean;   ε = UNet_LoRA(z, 999, CLIP(prompt))
    x̂0 = (z - √(1-ᾱ₉₉₉)·ε) / √ᾱ₉₉₉   (ᾱ from diffusers' DDPMScheduler);   y = clamp(D(x̂0 / 0.18215)) / 2 + 1/2

S3Diff (ArcticHare105/S3Diff ``s3diff_tile.py``, ``model.py``, ``inference_s3diff.py``): the same with the
degradation-modulated LoRA (``my_lora_fwd``: B(einsum(A x, de_mod)) · scaling, de_mod from the MLPs),
bilinear ×s with align_corners=True, reflect padding to 64, the UNet run for the positive and the negative
prompt and ε = ε₋ + 1.07·(ε₊ - ε₋), and the crop. Both tile latents larger than the tile size in their own way
(``tiled_noise_prediction``).

SD-Turbo / SDXL-Turbo (diffusers' Euler, trailing, one step): x = σ·n, ε = UNet(x/√(σ²+1), 999, c[, pooled,
time ids]), x̂0 = x - σ·ε.   InstaFlow (gnobitab/InstaFlow ``pipeline_rf.py``): z = n + UNet(n, 1000, c).

Colour fixes (``wavelet_color_fix.py`` of both repositories) on float tensors.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

S3DIFF_POSITIVE = ("A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, "
                   "and natural lighting.")
S3DIFF_NEGATIVE = ("oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, "
                   "oversmooth")
S3DIFF_GUIDANCE = 1.07
TIMESTEP = 999
FLOW_TIME = 1000.0


# -- shared pieces -------------------------------------------------------------------------------------------

def load_text_side(folder: str, suffix: str = ""):
    """(transformers tokenizer, text encoder) of a pipeline folder, as the reference scripts load them."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer" + suffix)
    cls = CLIPTextModelWithProjection if suffix else CLIPTextModel
    return tokenizer, cls.from_pretrained(folder, subfolder="text_encoder" + suffix).eval()


def token_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(prompts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """(B, 77, D): ``text_encoder(ids)[0]``, the last hidden state after the final LayerNorm."""
    return text_encoder(token_ids(tokenizer, prompts))[0]


def alpha_bar(folder: str, t: int = TIMESTEP) -> torch.Tensor:
    """ᾱ_t of the folder's schedule, from diffusers' DDPMScheduler (how OSEDiff and S3Diff build theirs)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod[t]


def ddpm_x0(z: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x̂0 = (z - √(1-ᾱ)·ε) / √ᾱ (the prev_sample of DDPMScheduler.step at t=999 with one step), in fp32 as the
    scheduler's fp32 ᾱ[tensor([999])] promotes it in the reference's fp16 runs."""
    return (z.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()


@torch.no_grad()
def decode(vae, x0: torch.Tensor) -> torch.Tensor:
    """clamp(D(x̂0 / scaling), -1, 1) / 2 + 1/2, in [0, 1] (float32); x̂0 enters in the VAE's dtype."""
    return vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float().clamp(-1, 1) * 0.5 + 0.5


class Reference:
    """A reference pipeline; ``cast(dtype)`` gives a copy whose models (and weights tensors) run in ``dtype``,
    as the reference scripts' ``--mixed_precision`` / ``torch_dtype`` runs do; the one-step formulas stay fp32."""

    dtype = torch.float32
    cast_tensors: Tuple[str, ...] = ()

    def cast(self, dtype: torch.dtype) -> "Reference":
        other = copy.copy(self)
        other.dtype = dtype
        for name, value in vars(self).items():
            if isinstance(value, nn.Module):
                setattr(other, name, copy.deepcopy(value).to(dtype))
            elif isinstance(value, dict) and value and all(isinstance(v, nn.Module) for v in value.values()):
                setattr(other, name, {k: copy.deepcopy(v).to(dtype) for k, v in value.items()})
            elif name in self.cast_tensors:
                setattr(other, name, value.to(dtype))
        return other


def load_base(folder: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
            AutoencoderKL.from_pretrained(folder, subfolder="vae").eval())


# -- OSEDiff -------------------------------------------------------------------------------------------------

def upsample_bicubic(lq: torch.Tensor, scale: float) -> torch.Tensor:
    """OSEDiff's ×s bicubic resize; the reference resizes an 8-bit PIL image, whose overshoot saturates at 0 and
    255, hence the clamp."""
    return F.interpolate(lq, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def upsample_bilinear(lq: torch.Tensor, scale: int) -> torch.Tensor:
    """S3Diff's ×s resize (inference_s3diff.py): bilinear with align_corners=True."""
    height, width = lq.shape[-2:]
    return F.interpolate(lq, size=(height * scale, width * scale), mode="bilinear", align_corners=True)


def gaussian_weights(tile_width: int, tile_height: int) -> torch.Tensor:
    """OSEDiff's ``_gaussian_weights`` (float64, (T, T)): exp(-(u-mid)²/(T²·2·0.01)) / √(2π·0.01) per axis, the
    x midpoint (T-1)/2 and the y midpoint T/2."""
    var = 0.01
    midpoint = (tile_width - 1) / 2
    x_probs = [math.exp(-(x - midpoint) * (x - midpoint) / (tile_width * tile_width) / (2 * var))
               / math.sqrt(2 * math.pi * var) for x in range(tile_width)]
    midpoint = tile_height / 2
    y_probs = [math.exp(-(y - midpoint) * (y - midpoint) / (tile_height * tile_height) / (2 * var))
               / math.sqrt(2 * math.pi * var) for y in range(tile_height)]
    return torch.outer(torch.tensor(y_probs, dtype=torch.float64), torch.tensor(x_probs, dtype=torch.float64))


def tiled_noise_prediction(unet, lq_latent: torch.Tensor, tile_size: int, tile_overlap: int) -> torch.Tensor:
    """OSEDiff_test.forward's latent tiling (S3Diff's is the same): the grid, one UNet call per tile (batch 1
    images), the Gaussian-weighted average of the tiles' noise predictions."""
    _, _, h, w = lq_latent.size()
    tile_size = min(tile_size, min(h, w))
    tile_weights = gaussian_weights(tile_size, tile_size)
    grid_rows, cur_x = 0, 0
    while cur_x < lq_latent.size(-1):
        cur_x = max(grid_rows * tile_size - tile_overlap * grid_rows, 0) + tile_size
        grid_rows += 1
    grid_cols, cur_y = 0, 0
    while cur_y < lq_latent.size(-2):
        cur_y = max(grid_cols * tile_size - tile_overlap * grid_cols, 0) + tile_size
        grid_cols += 1

    def offsets(row: int, col: int) -> Tuple[int, int]:
        ofs_x = max(row * tile_size - tile_overlap * row, 0)
        ofs_y = max(col * tile_size - tile_overlap * col, 0)
        if row == grid_rows - 1:
            ofs_x = w - tile_size
        if col == grid_cols - 1:
            ofs_y = h - tile_size
        return ofs_x, ofs_y

    noise_pred = torch.zeros(lq_latent.shape)
    contributors = torch.zeros(lq_latent.shape)
    for row in range(grid_rows):
        for col in range(grid_cols):
            ofs_x, ofs_y = offsets(row, col)
            tile = lq_latent[:, :, ofs_y:ofs_y + tile_size, ofs_x:ofs_x + tile_size]
            noise_pred[:, :, ofs_y:ofs_y + tile_size, ofs_x:ofs_x + tile_size] += unet(tile) * tile_weights
            contributors[:, :, ofs_y:ofs_y + tile_size, ofs_x:ofs_x + tile_size] += tile_weights
    return noise_pred / contributors


class OSEDiffReference(Reference):
    """OSEDiff_test: the base models with the checkpoint's peft adapters loaded as ``load_ckpt`` loads them."""

    def __init__(self, folder: str, pkl: str):
        from peft import LoraConfig

        self.folder = folder
        self.unet, self.vae = load_base(folder)
        self.tokenizer, self.text_encoder = load_text_side(folder)
        model = torch.load(pkl, map_location="cpu", weights_only=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")  # three adapters
            for adapter in ("encoder", "decoder", "others"):
                config = LoraConfig(r=model["rank_unet"], init_lora_weights="gaussian",
                                    target_modules=model[f"unet_lora_{adapter}_modules"])
                self.unet.add_adapter(config, adapter_name=f"default_{adapter}")
        with torch.no_grad():
            for name, parameter in self.unet.named_parameters():
                if "lora" in name or "conv_in" in name:
                    parameter.copy_(model["state_dict_unet"][name])
        self.unet.set_adapter(["default_encoder", "default_decoder", "default_others"])
        vae_config = LoraConfig(r=model["rank_vae"], init_lora_weights="gaussian",
                                target_modules=model["vae_lora_encoder_modules"])
        self.vae.add_adapter(vae_config, adapter_name="default_encoder")
        with torch.no_grad():
            for name, parameter in self.vae.named_parameters():
                if "lora" in name:
                    parameter.copy_(model["state_dict_vae"][name])
        self.vae.set_adapter(["default_encoder"])
        self.alpha_bar = alpha_bar(folder)

    @torch.no_grad()
    def __call__(self, lq: torch.Tensor, prompts: Sequence[str], scale: int = 4,
                 prompt_embeds: Optional[torch.Tensor] = None, sample_seed: Optional[int] = None,
                 latent_tiled_size: int = 96, latent_tiled_overlap: int = 32) -> torch.Tensor:
        """lq (B, 3, h, w) in [0, 1] with s·h, s·w multiples of 8 -> (B, 3, s·h, s·w) in [0, 1], no colour fix.

        The latent is the posterior mean, or with ``sample_seed`` ``latent_dist.sample`` from a CPU generator.
        Latents larger than ``latent_tiled_size``² run in tiles (the script's --latent_tiled_size/_overlap)."""
        lq_up = upsample_bicubic(lq, scale)
        context = prompt_embeds if prompt_embeds is not None else encode_prompts(self.tokenizer, self.text_encoder,
                                                                                 prompts)
        posterior = self.vae.encode((lq_up * 2 - 1).to(self.dtype)).latent_dist
        if sample_seed is None:
            latent = posterior.mean
        else:
            latent = posterior.sample(generator=torch.Generator(device="cpu").manual_seed(sample_seed))
        z = latent * self.vae.config.scaling_factor

        def unet(tiles: torch.Tensor) -> torch.Tensor:
            return self.unet(tiles, torch.tensor([TIMESTEP]), encoder_hidden_states=context).sample

        height, width = z.shape[-2:]
        if height * width <= latent_tiled_size * latent_tiled_size:
            eps = unet(z)
        else:
            eps = tiled_noise_prediction(unet, z, latent_tiled_size, latent_tiled_overlap)
        return decode(self.vae, ddpm_x0(z, eps, self.alpha_bar))


# -- S3Diff --------------------------------------------------------------------------------------------------

def my_lora_fwd(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """S3Diff's forward of a peft LoRA layer: base(x) + B(einsum(A(x), de_mod)) · scaling, where ``de_mod``
    (B, r, r) is set on the layer per call; Linear: '...lk,...kr->...lr', Conv: '...khw,...kr->...rhw'."""
    result = self.base_layer(x, *args, **kwargs)
    for adapter in self.active_adapters:
        if adapter not in self.lora_A.keys():
            continue
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        hidden = lora_a(self.lora_dropout[adapter](x.to(lora_a.weight.dtype)))
        if isinstance(lora_a, nn.Conv2d):
            hidden = torch.einsum("...khw,...kr->...rhw", hidden, self.de_mod)
        elif isinstance(lora_a, nn.Linear):
            hidden = torch.einsum("...lk,...kr->...lr", hidden, self.de_mod)
        else:
            raise NotImplementedError(type(lora_a))
        result = result + lora_b(hidden) * self.scaling[adapter]
    return result


def _linear_relu(features_in: int, features_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features_in, features_out), nn.ReLU(True))


class S3DiffReference(Reference):
    """S3Diff (s3diff_tile.py) with ``pretrained_path``: adapters, MLPs and embeddings from the .pkl, then
    ``my_lora_fwd`` on every LoRA layer, and the DE net of ``de_net.py``."""

    cast_tensors = ("w",)

    def __init__(self, folder: str, pkl: str, de_net: str):
        from peft import LoraConfig

        self.unet, self.vae = load_base(folder)
        self.tokenizer, self.text_encoder = load_text_side(folder)
        sd = torch.load(pkl, map_location="cpu", weights_only=True)
        self.rank_unet, self.rank_vae = sd["rank_unet"], sd["rank_vae"]
        self.vae.add_adapter(LoraConfig(r=sd["rank_vae"], init_lora_weights="gaussian",
                                        target_modules=sd["vae_lora_target_modules"]), adapter_name="vae_skip")
        self.vae.load_state_dict({**self.vae.state_dict(), **sd["state_dict_vae"]})
        self.unet.add_adapter(LoraConfig(r=sd["rank_unet"], init_lora_weights="gaussian",
                                         target_modules=sd["unet_lora_target_modules"]))
        self.unet.load_state_dict({**self.unet.state_dict(), **sd["state_dict_unet"]})
        self.mlps: Dict[str, nn.Module] = {
            "vae_de_mlp": _linear_relu(256, 256), "unet_de_mlp": _linear_relu(256, 256),
            "vae_block_mlp": _linear_relu(64, 64), "unet_block_mlp": _linear_relu(64, 64),
            "vae_fuse_mlp": nn.Linear(320, self.rank_vae ** 2), "unet_fuse_mlp": nn.Linear(320, self.rank_unet ** 2),
        }
        for name, module in self.mlps.items():
            module.load_state_dict(sd[f"state_dict_{name}"])
        self.w = sd["w"]
        self.vae_block_embeddings, self.unet_block_embeddings = nn.Embedding(6, 64), nn.Embedding(10, 64)
        self.vae_block_embeddings.load_state_dict(sd["state_embeddings"]["state_dict_vae_block"])
        self.unet_block_embeddings.load_state_dict(sd["state_embeddings"]["state_dict_unet_block"])
        self.vae_lora_layers = self._patch(self.vae)
        self.unet_lora_layers = self._patch(self.unet)
        self.de_net = DEResNet()
        self.de_net.load_state_dict(torch.load(de_net, map_location="cpu", weights_only=True), strict=True)
        self.de_net.eval()
        self.alpha_bar = alpha_bar(folder)

    @staticmethod
    def _patch(model: nn.Module) -> List[str]:
        layers = [name[: -len(".base_layer")] for name, _ in model.named_modules() if "base_layer" in name]
        for name, module in model.named_modules():
            if name in layers:
                module.forward = my_lora_fwd.__get__(module, module.__class__)
        return layers

    @torch.no_grad()
    def mixing(self, deg_score: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(vae_embeds (B, 6, r_v²), unet_embeds (B, 10, r_u²)) from the degradation scores (B, 2)."""
        deg_proj = deg_score[..., None] * self.w[None, None, :] * 2 * math.pi
        deg_proj = torch.cat([torch.sin(deg_proj), torch.cos(deg_proj)], dim=-1)
        deg_proj = torch.cat([deg_proj[:, 0], deg_proj[:, 1]], dim=-1)
        vae_de = self.mlps["vae_de_mlp"](deg_proj)
        unet_de = self.mlps["unet_de_mlp"](deg_proj)
        vae_block = self.mlps["vae_block_mlp"](self.vae_block_embeddings.weight)
        unet_block = self.mlps["unet_block_mlp"](self.unet_block_embeddings.weight)
        vae_embeds = self.mlps["vae_fuse_mlp"](torch.cat([vae_de.unsqueeze(1).repeat(1, vae_block.shape[0], 1),
                                                          vae_block.unsqueeze(0).repeat(vae_de.shape[0], 1, 1)], -1))
        unet_embeds = self.mlps["unet_fuse_mlp"](torch.cat([unet_de.unsqueeze(1).repeat(1, unet_block.shape[0], 1),
                                                            unet_block.unsqueeze(0).repeat(unet_de.shape[0], 1, 1)],
                                                           -1))
        return vae_embeds, unet_embeds

    def _set_de_mod(self, vae_embeds: torch.Tensor, unet_embeds: torch.Tensor) -> None:
        for name, module in self.vae.named_modules():
            if name in self.vae_lora_layers:
                split = name.split(".")
                if split[1] == "down_blocks":
                    embed = vae_embeds[:, int(split[2])]
                elif split[1] == "mid_block":
                    embed = vae_embeds[:, -2]
                else:
                    embed = vae_embeds[:, -1]
                module.de_mod = embed.reshape(-1, self.rank_vae, self.rank_vae)
        for name, module in self.unet.named_modules():
            if name in self.unet_lora_layers:
                split = name.split(".")
                if split[0] == "down_blocks":
                    embed = unet_embeds[:, int(split[1])]
                elif split[0] == "mid_block":
                    embed = unet_embeds[:, 4]
                elif split[0] == "up_blocks":
                    embed = unet_embeds[:, int(split[1]) + 5]
                else:
                    embed = unet_embeds[:, -1]
                module.de_mod = embed.reshape(-1, self.rank_unet, self.rank_unet)

    @torch.no_grad()
    def __call__(self, im_lr: torch.Tensor, scale: int = 4, positive: str = S3DIFF_POSITIVE,
                 negative: str = S3DIFF_NEGATIVE, deg_score: Optional[torch.Tensor] = None) -> torch.Tensor:
        """im_lr (B, 3, h, w) in [0, 1] -> (B, 3, s·h, s·w) in [0, 1], no colour fix (inference_s3diff.py).
        ``deg_score`` (B, 2) replaces the DE net's estimate."""
        batch = im_lr.shape[0]
        resized = upsample_bilinear(im_lr, scale)
        c_t = torch.clamp(resized * 2 - 1.0, -1.0, 1.0)
        resize_h, resize_w = c_t.shape[2:]
        pad_h = math.ceil(resize_h / 64) * 64 - resize_h
        pad_w = math.ceil(resize_w / 64) * 64 - resize_w
        c_t = F.pad(c_t, pad=(0, pad_w, 0, pad_h), mode="reflect").to(self.dtype)
        if deg_score is None:
            deg_score = self.de_net(im_lr.to(self.dtype))
        positive_enc = encode_prompts(self.tokenizer, self.text_encoder, [positive] * batch)
        negative_enc = encode_prompts(self.tokenizer, self.text_encoder, [negative] * batch)
        self._set_de_mod(*self.mixing(deg_score))
        latent = self.vae.encode(c_t).latent_dist.mean * self.vae.config.scaling_factor
        timesteps = torch.tensor([TIMESTEP]).long()
        positive_pred = self.unet(latent, timesteps, encoder_hidden_states=positive_enc).sample
        negative_pred = self.unet(latent, timesteps, encoder_hidden_states=negative_enc).sample
        model_pred = negative_pred + S3DIFF_GUIDANCE * (positive_pred - negative_pred)
        image = decode(self.vae, ddpm_x0(latent, model_pred, self.alpha_bar))
        return image[:, :, :resize_h, :resize_w]


class ResidualBlockNoBN(nn.Module):
    """basicsr's residual block: x + conv2(ReLU(conv1(x))) (res_scale 1)."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class DEResNet(nn.Module):
    """S3Diff's de_net.py with its defaults (num_feats [64, 64, 64, 128], num_blocks [2, 2, 2, 2], downscales
    [1, 1, 2, 1], sigmoid degrees): per degradation a conv_first, a body of 6 RB64, a stride-2 conv to 128 and
    2 RB128, global average pooling, Linear(128, 512)-ReLU-Linear(512, 1)-Sigmoid."""

    def __init__(self, num_in_ch: int = 3, num_degradation: int = 2):
        super().__init__()
        self.conv_first = nn.ModuleList([nn.Conv2d(num_in_ch, 64, 3, 1, 1) for _ in range(num_degradation)])
        self.body = nn.ModuleList()
        for _ in range(num_degradation):
            body = [ResidualBlockNoBN(64) for _ in range(6)] + [nn.Conv2d(64, 128, 3, 2, 1)]
            body += [ResidualBlockNoBN(128) for _ in range(2)]
            self.body.append(nn.Sequential(*body))
        self.fc_degree = nn.ModuleList([nn.Sequential(nn.Linear(128, 512), nn.ReLU(inplace=True), nn.Linear(512, 1),
                                                      nn.Sigmoid()) for _ in range(num_degradation)])
        self.avg_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        degrees = []
        for conv_first, body, head in zip(self.conv_first, self.body, self.fc_degree):
            feat = self.avg_pool(body(conv_first(x))).squeeze(-1).squeeze(-1)
            degrees.append(head(feat).squeeze(-1))
        return torch.stack(degrees, dim=1)


# -- generators ----------------------------------------------------------------------------------------------

def latent_noise(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    """n ~ N(0, I) (B, 4, H/8, W/8) from ``torch.Generator("cpu").manual_seed(seed)``, float32."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((batch, 4, height // 8, width // 8), generator=generator, dtype=torch.float32)


def euler_sigma(folder: str, t: int = TIMESTEP) -> torch.Tensor:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) with ᾱ from the folder's scheduler (EulerDiscreteScheduler's sigmas)."""
    from diffusers import EulerDiscreteScheduler

    a = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler").alphas_cumprod[t]
    return ((1 - a) / a).sqrt()


class TurboReference(Reference):
    """SD-Turbo and SDXL-Turbo in one Euler step: x = σ·n, ε = UNet(x/√(σ²+1), 999, c[, added]), x̂0 = x - σ·ε."""

    def __init__(self, folder: str):
        self.folder = folder
        self.unet, self.vae = load_base(folder)
        self.tokenizer, self.text_encoder = load_text_side(folder)
        self.sdxl = os.path.isdir(os.path.join(folder, "text_encoder_2"))
        if self.sdxl:
            self.tokenizer_2, self.text_encoder_2 = load_text_side(folder, "_2")
        self.sigma = euler_sigma(folder)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(context, pooled): SD-Turbo the last hidden state; SDXL the two penultimate states concatenated and
        the second encoder's projected end token (StableDiffusionXLPipeline.encode_prompt, clip_skip None)."""
        if not self.sdxl:
            return encode_prompts(self.tokenizer, self.text_encoder, prompts), None
        first = self.text_encoder(token_ids(self.tokenizer, prompts), output_hidden_states=True)
        second = self.text_encoder_2(token_ids(self.tokenizer_2, prompts), output_hidden_states=True)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second[0]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seed: int, height: int, width: int,
                 context: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        if context is None:
            context, pooled = self.encode(prompts)
        batch = context.shape[0]
        x = latent_noise(batch, height, width, seed) * self.sigma
        added = None
        if self.sdxl:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype).repeat(batch, 1)
            added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids}
        t = torch.full((batch,), float(TIMESTEP))
        model_input = (x / (self.sigma**2 + 1).sqrt()).to(self.dtype)
        eps = self.unet(model_input, t, encoder_hidden_states=context.to(self.dtype), added_cond_kwargs=added).sample
        return decode(self.vae, x - self.sigma * eps.float())


class InstaFlowReference(Reference):
    """One Euler step of the rectified flow: z = n + v(n, 1000, c), with v guided against "" when g > 1."""

    def __init__(self, folder: str):
        self.unet, self.vae = load_base(folder)
        self.tokenizer, self.text_encoder = load_text_side(folder)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seed: int, height: int, width: int,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        context = encode_prompts(self.tokenizer, self.text_encoder, prompts)
        batch = context.shape[0]
        latents = latent_noise(batch, height, width, seed)
        model_input = latents.to(self.dtype)
        vec_t = torch.ones((batch,)) * FLOW_TIME
        if guidance_scale > 1.0:
            empty = encode_prompts(self.tokenizer, self.text_encoder, [""] * batch)
            v = self.unet(torch.cat([model_input, model_input]), torch.cat([vec_t, vec_t]),
                          encoder_hidden_states=torch.cat([empty, context])).sample.float()
            v_uncond, v_text = v.chunk(2)
            v = v_uncond + guidance_scale * (v_text - v_uncond)
        else:
            v = self.unet(model_input, vec_t, encoder_hidden_states=context).sample.float()
        return decode(self.vae, latents + 1.0 * v)


# -- colour fixes --------------------------------------------------------------------------------------------

def calc_mean_std(feat: torch.Tensor, eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    b, c = feat.shape[:2]
    std = (feat.reshape(b, c, -1).var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)
    mean = feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1)
    return mean, std


def adain_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """adaptive_instance_normalization(target, source), clamped to [0, 1]."""
    style_mean, style_std = calc_mean_std(source)
    content_mean, content_std = calc_mean_std(target)
    return ((target - content_mean) / content_std * style_std + style_mean).clamp(0, 1)


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                          dtype=image.dtype)[None, None].repeat(3, 1, 1, 1)
    image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(image, kernel, groups=3, dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> Tuple[torch.Tensor, torch.Tensor]:
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2**i)
        high += image - low
        image = low
    return high, low


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """wavelet_reconstruction(target, source): the target's high frequencies + the source's low, clamped."""
    target_high, _ = wavelet_decomposition(target)
    _, source_low = wavelet_decomposition(source)
    return (target_high + source_low).clamp(0, 1)
