"""D-UNet and the UNet baselines of the paper (Table 1, Table 2, Table 5).

All models take a batch of slabs ``[N, C, H, W]`` (``C`` consecutive axial
slices as channels, ``H`` and ``W`` divisible by 16) and return the lesion
probability of the label slice, ``[N, 1, H, W]``, with the sigmoid inside the
model (the exported ONNX carries it too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dunet_deploy.errors import DunetError

from .layers import ConvBlock, DimensionFusion, SamePadConv, UpBlock, he_normal_

FUSION_MODES = ("add", "se_add")


def _check_input(x: torch.Tensor, in_channels: int, depth: int) -> None:
    """``x`` must be ``[N, in_channels, H, W]`` with H, W divisible by ``2**(depth-1)``."""
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected input [N, {in_channels}, H, W], got {list(x.shape)}")
    multiple = 2 ** (depth - 1)
    h, w = int(x.shape[2]), int(x.shape[3])
    if h % multiple or w % multiple:
        # A user-visible choice (--image-size, a crop), not a bug: one line, not a torch error.
        raise DunetError(f"input slabs are {h}x{w}: H and W must be divisible by {multiple} "
                         f"(the model pools {depth - 1} times); use an image size like "
                         f"{max(multiple, (h // multiple) * multiple)}")


class _Decoder2D(nn.Module):
    """Four up-steps from the bottleneck back to full resolution.

    Shapes: ``feats`` = encoder outputs ``[f1 .. f5]`` with ``f_i`` of
    ``[N, base*2^(i-1), H/2^(i-1), W/2^(i-1)]`` -> ``[N, base, H, W]``.
    """

    def __init__(self, widths: Sequence[int], batch_norm: bool) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], dims=2, batch_norm=batch_norm)
            for i in reversed(range(len(widths) - 1))
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            x = up(x, skip)
        return x


class UNet2D(nn.Module):
    """The 2D UNet baseline: "transform" (BN, 32…512) or "original" (no BN, 64…1024).

    Shapes: ``[N, in_channels, H, W] -> [N, 1, H, W]`` (probabilities).

    Args:
        in_channels: slices per slab (1 for the paper's 2D UNet).
        base_filters: filters of the first block; doubled after each pooling.
        depth: number of encoder blocks (5 in the paper).
        batch_norm: BN after each convolution.
        dropout: dropout after the last two encoder blocks.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_filters: int = 32,
        depth: int = 5,
        batch_norm: bool = True,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        widths = [base_filters * 2**i for i in range(depth)]
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, dims=2, batch_norm=batch_norm)
            for cin, cout in zip([in_channels, *widths[:-1]], widths)
        )
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.decoder = _Decoder2D(widths, batch_norm)
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1)
        he_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, len(self.blocks))
        feats: list[torch.Tensor] = []
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            if i >= depth - 2:  # dropout after blocks 4 and 5, skip included
                x = self.dropout(x)
            feats.append(x)
        return torch.sigmoid(self.head(self.decoder(feats)))


class DUNet(nn.Module):
    """D-UNet: a 2D UNet whose early encoder is fused with a shallow 3D stream.

    The 3D stream sees the slab as a volume ``[N, 1, C, H, W]`` and is built as
    deep as the deepest fusion level needs (3D block ``l`` has ``base*2^(l-1)``
    filters, 2×2×2 pooling in between, so with 4 slices the depth goes
    4 -> 2 -> 1). After 2D block ``l`` in ``fusion_levels`` a
    :class:`~dunet_deploy.models.layers.DimensionFusion` merges the two.

    Shapes: ``[N, in_channels, H, W] -> [N, 1, H, W]`` (probability of the label
    slice).

    Args:
        in_channels: slices per slab (4 in the paper).
        base_filters: filters of the first 2D and 3D blocks.
        depth: 2D encoder blocks.
        fusion: ``"se_add"`` (SE on both branches, then add) or ``"add"``.
        fusion_levels: subset of ``{1, 2, 3}``; ``(2, 3)`` is the paper's model.
        dropout: dropout after the last two 2D encoder blocks.
    """

    def __init__(
        self,
        in_channels: int = 4,
        base_filters: int = 32,
        depth: int = 5,
        fusion: str = "se_add",
        fusion_levels: Sequence[int] = (2, 3),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
        levels = tuple(sorted(set(int(v) for v in fusion_levels)))
        if not levels or any(v < 1 or v > 3 for v in levels):
            raise ValueError(f"fusion_levels must be a non-empty subset of {{1,2,3}}, got {levels}")
        if in_channels % 2 ** (levels[-1] - 1):
            raise ValueError(
                f"in_channels={in_channels} cannot be pooled {levels[-1] - 1} times by 2 in depth"
            )
        self.in_channels = in_channels
        self.fusion_levels = levels
        widths = [base_filters * 2**i for i in range(depth)]

        self.blocks3d = nn.ModuleList(
            ConvBlock(cin, cout, dims=3)
            for cin, cout in zip([1, *widths[: levels[-1] - 1]], widths[: levels[-1]])
        )
        self.pool3d = nn.MaxPool3d(2)
        self.fusions = nn.ModuleDict(
            {
                str(lvl): DimensionFusion(
                    widths[lvl - 1],
                    in_channels // 2 ** (lvl - 1),
                    widths[lvl - 1],
                    se=fusion == "se_add",
                )
                for lvl in levels
            }
        )
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, dims=2) for cin, cout in zip([in_channels, *widths[:-1]], widths)
        )
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout(dropout)
        self.decoder = _Decoder2D(widths, batch_norm=True)
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1)
        he_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, len(self.blocks))
        feats3d: list[torch.Tensor] = []
        v = x.unsqueeze(1)  # [N, 1, D=C, H, W]
        for i, block in enumerate(self.blocks3d):
            v = block(v if i == 0 else self.pool3d(v))
            feats3d.append(v)

        feats: list[torch.Tensor] = []
        depth = len(self.blocks)
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            level = str(i + 1)
            if level in self.fusions:
                x = self.fusions[level](feats3d[i], x)
            if i >= depth - 2:
                x = self.dropout(x)
            feats.append(x)
        return torch.sigmoid(self.head(self.decoder(feats)))


class UNet3D(nn.Module):
    """The paper's "3D UNet (transform)": a 3D UNet over the slab that keeps its depth.

    3D blocks of ``base…base*16`` filters with 2×2×1 pooling (H and W only), a 3D
    decoder, then a ``1×1×1`` conv + ReLU to one channel; the depth becomes the
    channel axis and a 2D BN block of ``base`` filters and a ``1×1`` sigmoid conv
    give the label slice.

    Shapes: ``[N, in_channels, H, W] -> [N, 1, H, W]``.
    """

    def __init__(
        self, in_channels: int = 4, base_filters: int = 32, depth: int = 5, dropout: float = 0.3
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        widths = [base_filters * 2**i for i in range(depth)]
        self.blocks = nn.ModuleList(
            ConvBlock(cin, cout, dims=3) for cin, cout in zip([1, *widths[:-1]], widths)
        )
        self.pool = nn.MaxPool3d((1, 2, 2))
        self.dropout = nn.Dropout(dropout)
        self.ups = nn.ModuleList(
            UpBlock(widths[i + 1], widths[i], widths[i], dims=3)
            for i in reversed(range(depth - 1))
        )
        self.to_slices = nn.Conv3d(widths[0], 1, kernel_size=1)
        self.block2d = ConvBlock(in_channels, base_filters, dims=2)
        self.head = nn.Conv2d(base_filters, 1, kernel_size=1)
        he_normal_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, len(self.blocks))
        v = x.unsqueeze(1)
        feats: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            v = block(v if i == 0 else self.pool(v))
            if i >= len(self.blocks) - 2:
                v = self.dropout(v)
            feats.append(v)
        v = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            v = up(v, skip)
        s = torch.relu(self.to_slices(v)).squeeze(1)  # [N, D, H, W]
        return torch.sigmoid(self.head(self.block2d(s)))


__all__ = ["FUSION_MODES", "DUNet", "SamePadConv", "UNet2D", "UNet3D"]
