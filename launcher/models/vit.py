"""A small Vision Transformer: patch embedding, class token, pre-norm encoder.

Width 1: 6 layers, 3 heads of 64 dims (embedding 192), MLP ratio 4. The patch
side is about a eighth of the shorter input side, so 28x28 and 32x32 images give
7x7 and 8x8 patch grids, an 8x8 digit gives 8x8 one-pixel patches and a
40-sample signal 8 patches of 5; rows or columns left over are dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from launcher.models.layers import channels_first, conv, scaled


def patch_size(spatial: tuple[int, ...]) -> int:
    return max(1, round(min(spatial) / 8))


class ViT(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: float = 1.0,
        depth: int = 6,
        heads: int = 3,
        head_dim: int = 64,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        in_channels, spatial, self.to_channels_first = channels_first(input_shape)
        rank = len(spatial)
        patch = patch_size(spatial)
        num_patches = 1
        for side in spatial:
            num_patches *= side // patch
        dim = heads * scaled(head_dim, width)
        self.patch_embed = conv(rank, in_channels, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.class_token, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=mlp_ratio * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors are a padding-mask speed-up that pre-norm layers cannot use.
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.to_channels_first(x)).flatten(2).transpose(1, 2)
        class_token = self.class_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([class_token, tokens], dim=1) + self.position
        features = self.norm(self.encoder(tokens))[:, 0]
        return self.classifier(features)
