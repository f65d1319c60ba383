"""CLIP text encoders (SD 1.x CLIP-L, SD 2.x OpenCLIP-H, SDXL's CLIP-L + OpenCLIP-bigG) in the transformers layout.

    x = token_embedding(ids) + position_embedding[:L]                      (B, L, D)
    x = x + out_proj(causal_attention(layer_norm1(x)))                      per layer
    x = x + fc2(act(fc1(layer_norm2(x))))                                   act: quick_gelu or exact gelu
    last_hidden_state = final_layer_norm(x)
    pooled = last_hidden_state[b, end token of b] (· text_projectionᵀ for the projection model)

Keys are those of the ``text_encoder/model.safetensors`` files: ``text_model.embeddings.token_embedding.weight``,
``text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2``, ``layer_norm1/2``,
``text_model.final_layer_norm``, ``text_projection.weight``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import merge_heads, split_heads
from .configs import CLIPTextConfig
from .layers import Linear, LoRAModelMixin
from .tokenizer import CLIPTokenizer

LEGACY_EOS_TOKEN_ID = 2


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(1.702 x), OpenAI CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention: (B, L, D) -> (B, L, D); scale head_dim^-1/2."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        width = config.hidden_size
        self.heads = config.num_attention_heads
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.q_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.heads)  # (B, h, L, d)
        k = split_heads(self.k_proj(x), self.heads)
        v = split_heads(self.v_proj(x), self.heads)
        # NOTE: flashstep.ops.attention has no mask; 77 causal tokens once per prompt cost nothing, so torch's
        # SDPA does it.
        return self.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True)))


class CLIPMLP(nn.Module):
    """fc2(act(fc1(x))): (B, L, D) -> (B, L, D) through the intermediate width."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(self.layer_norm1(x)).add_(x)
        return self.mlp(self.layer_norm2(x)).add_(x)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, D)."""
        length, positions = input_ids.shape[-1], self.position_embedding.num_embeddings
        if length > positions:
            raise ValueError(f"{length} tokens exceed the {positions} positions of this encoder")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    """``text_model``: embeddings, encoder layers, final_layer_norm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module, LoRAModelMixin):
    """A CLIP text encoder, with ``text_projection`` when ``config.with_projection`` (see the module docstring)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.with_projection:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)
        self.requires_grad_(False)

    def pooled_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) position of each sequence's end token, as transformers picks it for this config."""
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            return input_ids.argmax(dim=-1)  # the end token has the largest id in the CLIP vocabulary
        return (input_ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, *, penultimate: bool = False, pooled: bool = False
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """input_ids (B, L) -> hidden states (B, L, D) [, pooled (B, projection_dim or D)].

        The hidden states are the last layer's after final_layer_norm, or with ``penultimate`` the output
        of the layer before the last without any norm (transformers' ``hidden_states[-2]``, SDXL's
        context; the last layer then does not run unless ``pooled`` needs it). ``pooled`` also returns the
        end token's final-normed state, projected when the model has ``text_projection``.
        """
        model = self.text_model
        x = model.embeddings(input_ids)
        layers = model.encoder.layers
        penultimate_state = None
        for index, layer in enumerate(layers):
            if penultimate and index == len(layers) - 1:
                penultimate_state = x
                if not pooled:
                    break
            x = layer(x)
        hidden = penultimate_state if penultimate else model.final_layer_norm(x)
        if not pooled:
            return hidden
        last = hidden if not penultimate else model.final_layer_norm(x)
        rows = torch.arange(last.shape[0], device=last.device)
        pooled_state = last[rows, self.pooled_index(input_ids).to(last.device)]  # (B, D)
        if self.config.with_projection:
            pooled_state = self.text_projection(pooled_state)
        return hidden, pooled_state

    def encode_prompt(self, prompts: Union[str, Sequence[str]], tokenizer: CLIPTokenizer, *, penultimate: bool = False,
                      pooled: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Tokenize (pad to 77) and encode: a list of B prompts -> (B, 77, D) [, pooled]; see :meth:`forward`."""
        input_ids = tokenizer(prompts).to(self.text_model.embeddings.token_embedding.weight.device)
        return self.forward(input_ids, penultimate=penultimate, pooled=pooled)


class SDXLTextEncoders(nn.Module):
    """SDXL's two encoders: context = [CLIP-L penultimate ‖ bigG penultimate], pooled = bigG's projection.

    ids_l, ids_bigg: (B, 77) -> context (B, 77, 768 + 1280 = 2048), pooled (B, 1280).
    """

    def __init__(self, clip_l: CLIPTextModel, clip_bigg: CLIPTextModel, tokenizer_l: Optional[CLIPTokenizer] = None,
                 tokenizer_bigg: Optional[CLIPTokenizer] = None):
        super().__init__()
        if not clip_bigg.config.with_projection:
            raise ValueError("SDXL's second encoder needs its text_projection (CLIPTextConfig.with_projection=True)")
        self.text_encoder = clip_l
        self.text_encoder_2 = clip_bigg
        self.tokenizer, self.tokenizer_2 = tokenizer_l, tokenizer_bigg

    def forward(self, ids_l: torch.Tensor, ids_bigg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        context_l = self.text_encoder(ids_l, penultimate=True)
        context_bigg, pooled = self.text_encoder_2(ids_bigg, penultimate=True, pooled=True)
        return torch.cat([context_l, context_bigg], dim=-1), pooled

    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """B prompts -> context (B, 77, 2048), pooled (B, 1280), each encoder with its own tokenizer."""
        if self.tokenizer is None or self.tokenizer_2 is None:
            raise ValueError("encode_prompt needs both tokenizers; pass tokenizer_l and tokenizer_bigg")
        device = self.text_encoder.text_model.embeddings.token_embedding.weight.device
        return self.forward(self.tokenizer(prompts).to(device), self.tokenizer_2(prompts).to(device))

