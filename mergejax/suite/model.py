"""A small vision transformer with the structure of CLIP's vision tower, and frozen heads.

Same parameter layout as CLIP ViT-B/32's visual encoder, scaled down to train on a 2-core
CPU: a patch-embedding convolution without bias, a class token and learned positional
embedding, ``ln_pre``, pre-LayerNorm residual blocks (multi-head self-attention, GELU MLP),
``ln_post`` on the class token, and a bias-free projection to the embedding space.
Classification follows CLIP's zero-shot head: cosine similarity between the normalised image
embedding and one (frozen) unit vector per class, times a fixed logit scale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

__all__ = ["LOGIT_SCALE", "ViTConfig", "VisionTransformer", "classify", "logits"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Sizes of the vision tower."""

    image_size: int = 28
    patch_size: int = 7
    width: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    embed_dim: int = 64


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    width: int
    heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(
            nn.LayerNorm(name="ln_1")(x))
        h = nn.LayerNorm(name="ln_2")(x)
        h = nn.Dense(self.width * self.mlp_ratio, name="mlp_fc")(h)
        h = nn.Dense(self.width, name="mlp_proj")(nn.gelu(h))
        return x + h


class VisionTransformer(nn.Module):
    """Images (N, H, W) or (N, H, W, C), uint8 or float in [0, 1] -> embeddings (N, D)."""

    config: ViTConfig = ViTConfig()

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        x = images
        if x.ndim == 3:
            x = x[..., None]
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32) / 255.0
        x = (x - 0.5) / 0.5
        x = nn.Conv(cfg.width, (cfg.patch_size, cfg.patch_size),
                    strides=(cfg.patch_size, cfg.patch_size), use_bias=False, name="conv1")(x)
        n = x.shape[0]
        x = x.reshape(n, -1, cfg.width)
        cls = self.param("class_embedding", nn.initializers.normal(cfg.width ** -0.5),
                         (cfg.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cfg.width)), x], axis=1)
        pos = self.param("positional_embedding", nn.initializers.normal(cfg.width ** -0.5),
                         (x.shape[1], cfg.width))
        x = nn.LayerNorm(name="ln_pre")(x + pos)
        for i in range(cfg.depth):
            x = ResidualBlock(cfg.width, cfg.heads, cfg.mlp_ratio, name=f"resblocks_{i}")(x)
        x = nn.LayerNorm(name="ln_post")(x[:, 0])
        return nn.Dense(cfg.embed_dim, use_bias=False, name="proj")(x)


#: CLIP's learned logit scale at the end of training is 100.
LOGIT_SCALE = 100.0


def logits(embeddings: jax.Array, head: jax.Array) -> jax.Array:
    """CLIP-style logits: scale * cos(embedding, class vector); ``head`` is (D, classes)."""
    e = embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
    h = head / jnp.linalg.norm(head, axis=0, keepdims=True)
    return LOGIT_SCALE * e @ h


def classify(model: VisionTransformer, params, head: jax.Array, images: jax.Array) -> jax.Array:
    """Class logits of ``images`` for a backbone ``params`` and a frozen ``head``."""
    return logits(model.apply({"params": params}, images), head)
