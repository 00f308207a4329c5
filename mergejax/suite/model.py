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

__all__ = ["LOGIT_SCALE", "MLP", "ResNet", "ViTConfig", "VisionTransformer", "classify", "logits"]


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


class MLP(nn.Module):
    """Images -> logits through dense layers ``Dense_0 ... Dense_L`` with ReLU (Git
    Re-Basin's MNIST MLP: three hidden layers of 512)."""

    features: tuple[int, ...] = (512, 512, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = _unit_images(images).reshape(images.shape[0], -1)
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Dense(width, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_classes, name=f"Dense_{len(self.features)}")(x)


class ResNet(nn.Module):
    """He et al. 2016's CIFAR ResNet (depth 6n + 2: a stem, three stages of n basic
    blocks with 16, 32, 64 x ``width`` channels, stride 2 between stages, a 1x1
    projection on the shortcut where the shape changes), global average pooling and a
    dense ``head``. ``norm`` is ``"layer"`` (LayerNorm over channels, as Git Re-Basin's
    ResNet-20) or ``"batch"`` (BatchNorm; pass ``train`` and a ``batch_stats`` collection).
    Parameter names are those of `mergejax.align.resnet_spec`.
    """

    depth: int = 20
    width: int = 1
    num_classes: int = 10
    norm: str = "layer"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, not {self.depth}")
        blocks = (self.depth - 2) // 6
        x = _unit_images(images)
        x = nn.Conv(16 * self.width, (3, 3), use_bias=False, name="stem_conv")(x)
        x = nn.relu(_norm(self.norm, train, "stem_norm")(x))
        for s in range(3):
            for b in range(blocks):
                x = BasicBlock(16 * self.width * 2 ** s, 2 if s > 0 and b == 0 else 1,
                               self.norm, name=f"stage{s}_block{b}")(x, train)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class BasicBlock(nn.Module):
    """relu(shortcut(x) + norm2(conv2(relu(norm1(conv1(x)))))), 3x3 convolutions; the
    shortcut is a strided 1x1 convolution and a norm where the shape changes."""

    channels: int
    stride: int
    norm: str

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        stride = (self.stride, self.stride)
        h = nn.Conv(self.channels, (3, 3), stride, use_bias=False, name="conv1")(x)
        h = nn.relu(_norm(self.norm, train, "norm1")(h))
        h = nn.Conv(self.channels, (3, 3), use_bias=False, name="conv2")(h)
        h = _norm(self.norm, train, "norm2")(h)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), stride, use_bias=False, name="shortcut_conv")(x)
            x = _norm(self.norm, train, "shortcut_norm")(x)
        return nn.relu(x + h)


def _norm(kind: str, train: bool, name: str) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, name=name)
    if kind == "layer":
        return nn.LayerNorm(name=name)
    raise ValueError(f"norm must be 'layer' or 'batch', not {kind!r}")


def _unit_images(images: jax.Array) -> jax.Array:
    """(N, H, W[, C]) uint8 or float in [0, 1] -> float (N, H, W, C) in [-1, 1]."""
    x = images[..., None] if images.ndim == 3 else images
    if jnp.issubdtype(x.dtype, jnp.integer):
        x = x.astype(jnp.float32) / 255.0
    return (x - 0.5) / 0.5
