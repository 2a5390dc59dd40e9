"""The networks G_theta(x, c_noise(t), c_noise(second time), label): an MLP for points and a small U-Net for
images. Both embed the two times with Fourier features and take a class label, with one extra
"null" class (index num_classes) for the unconditional output of classifier-free guidance."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class FourierEmbedding(nn.Module):
    """Sinusoidal features of c_noise = 1000 t at geometric frequencies from max_frequency down by 10^4 (DDPM's
    max_frequency: 1), then an MLP. DDPM's top features turn every 0.006 in t, which lets a small network's maps
    wiggle between nearby times (docs/few_step.md, "The network's time features")."""

    def __init__(self, dim: int, features: int = 64, max_frequency: float = 1.0):
        super().__init__()
        half = features // 2
        self.register_buffer("frequencies", max_frequency * torch.exp(-math.log(10_000) * torch.arange(half) / half),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        angles = noise.float()[:, None] * self.frequencies
        return self.mlp(torch.cat([angles.sin(), angles.cos()], 1))


class Conditioning(nn.Module):
    """One vector per sample from the two times and the label."""

    def __init__(self, dim: int, num_classes: int, time_frequency: float):
        super().__init__()
        self.embed_t, self.embed_second = (FourierEmbedding(dim, max_frequency=time_frequency) for _ in range(2))
        self.embed_label = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.null_label = num_classes

    def forward(self, noise_t, noise_second, labels):
        emb = self.embed_t(noise_t) + self.embed_second(noise_second)
        if self.embed_label is not None:
            if labels is None:
                labels = torch.full_like(noise_t, self.null_label, dtype=torch.long)
            emb = emb + self.embed_label(labels)
        return F.silu(emb)


class ResidualMLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.modulation = nn.Linear(width, 2 * width)  # scale and shift from the conditioning
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h, cond):
        scale, shift = self.modulation(cond).chunk(2, 1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class PointMLP(nn.Module):
    def __init__(self, dim: int, num_classes: int = 0, width: int = 256, depth: int = 3, time_frequency: float = 1.0):
        super().__init__()
        self.null_label = num_classes
        self.cond = Conditioning(width, num_classes, time_frequency)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, x, noise_t, noise_second, labels=None):
        cond = self.cond(noise_t, noise_second, labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.out(h)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, cond_dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(8, channels_in), nn.GroupNorm(8, channels_out)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.modulation = nn.Linear(cond_dim, 2 * channels_out)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x, cond):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.modulation(cond)[:, :, None, None].chunk(2, 1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class UNet(nn.Module):
    """Two resolutions (H and H/2; H must be even), two residual blocks each, skip connections."""

    def __init__(self, channels: int, num_classes: int = 0, width: int = 64, time_frequency: float = 1.0):
        super().__init__()
        self.null_label = num_classes
        cond_dim = 4 * width
        self.cond = Conditioning(cond_dim, num_classes, time_frequency)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down1 = ResBlock(width, width, cond_dim)
        self.downsample = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.down2 = ResBlock(2 * width, 2 * width, cond_dim)
        self.middle = ResBlock(2 * width, 2 * width, cond_dim)
        self.up2 = ResBlock(4 * width, 2 * width, cond_dim)
        self.upsample = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.up1 = ResBlock(2 * width, width, cond_dim)
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, x, noise_t, noise_second, labels=None):
        cond = self.cond(noise_t, noise_second, labels)
        h1 = self.down1(self.inp(x), cond)
        h2 = self.down2(self.downsample(h1), cond)
        h = self.middle(h2, cond)
        h = self.upsample(self.up2(torch.cat([h, h2], 1), cond))
        return self.out(self.up1(torch.cat([h, h1], 1), cond))


def build(kind: str, sample_shape: tuple[int, ...], num_classes: int, width: int,
          time_frequency: float = 1.0) -> nn.Module:
    """The network for a data set's kind ("points" or "images") and sample shape; time_frequency: the time
    features' highest frequency (FourierEmbedding's max_frequency)."""
    network = PointMLP if kind == "points" else UNet
    return network(sample_shape[0], num_classes, width, time_frequency=time_frequency)
