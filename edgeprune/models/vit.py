"""``vit_tiny``: a small Vision Transformer whose heads and MLP widths can be pruned.

Attention keeps timm's layout (one fused ``qkv`` linear, ``num_heads`` and
``head_dim`` as plain int attributes) because that is what Torch-Pruning's
head-aware pruning understands: pass ``{block.attn.qkv: block.attn.num_heads}``
as ``num_heads`` and, after ``pruner.step()``, write ``pruner.num_heads[qkv]``
back to ``num_heads``. The forward pass derives the head dimension from the
tensor, so a model whose head dims were pruned runs without further edits.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.errors import InputError
from edgeprune.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention with explicit qkv and output projections."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # Fixed at construction: pruning head dims keeps the trained softmax temperature.
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x)
        head_dim = qkv.shape[-1] // (3 * self.num_heads)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attention @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * head_dim)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear → GELU → linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Conv patch embedding + learned position embedding, transformer blocks, LayerNorm, mean pooling, linear."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise InputError(f"vit_tiny: image size {image_size} is not a multiple of the patch size {patch_size}")
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


@register_model(family="vit")
def vit_tiny(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch_size: int = 4) -> VisionTransformer:
    """ViT: 4×4 conv patches, 4 blocks of 4 heads × 16 dims, MLP ×2, mean pooling."""
    return VisionTransformer(num_classes, in_channels, image_size, patch_size)
