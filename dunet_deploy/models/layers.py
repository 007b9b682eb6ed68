"""Building blocks with Keras semantics, shared by every model of the zoo.

The paper's reference implementation is Keras 2.2 (channels-last). We use
PyTorch's channels-first layout and reproduce the Keras behaviour that changes
numbers: BatchNorm ``eps=1e-3`` and ``momentum=0.99`` (PyTorch's ``0.01``),
He-normal kernels with zero bias, and ``padding='same'`` for even kernels, where
TensorFlow puts the extra padding on the right/bottom (and back in 3D).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

#: Keras BatchNormalization defaults, translated to PyTorch's conventions.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # Keras momentum 0.99 == PyTorch momentum 0.01


def he_normal_(module: nn.Module) -> None:
    """Initialise conv/linear weights like Keras ``he_normal`` and zero the biases.

    Keras draws from a normal truncated at two standard deviations with
    ``std = sqrt(2 / fan_in)``.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            fan_in = m.weight[0].numel()
            std = (2.0 / fan_in) ** 0.5
            nn.init.trunc_normal_(m.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvBlock(nn.Module):
    """Two ``3×3`` (or ``3×3×3``) convolutions, each optionally followed by BN, then ReLU.

    Shapes: ``[N, C_in, (D,) H, W] -> [N, C_out, (D,) H, W]``.

    Args:
        in_ch: input channels.
        out_ch: output channels of both convolutions.
        dims: 2 or 3.
        batch_norm: add BatchNorm after each convolution (the paper's "transform"
            variants); ``False`` gives the original UNet block.
    """

    def __init__(self, in_ch: int, out_ch: int, dims: int = 2, batch_norm: bool = True) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        layers: list[nn.Module] = []
        for cin in (in_ch, out_ch):
            layers.append(conv(cin, out_ch, kernel_size=3, padding=1))
            if batch_norm:
                layers.append(bn(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM))
            layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SamePadConv(nn.Module):
    """Convolution with an even kernel and TensorFlow ``'same'`` padding, then ReLU.

    For a kernel of 2 the total padding is 1 per spatial axis and TensorFlow puts
    it after the data (right/bottom/back); PyTorch's symmetric ``padding`` cannot
    express that, so we pad explicitly.

    Shapes: ``[N, C_in, (D,) H, W] -> [N, C_out, (D,) H, W]``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 2, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(in_ch, out_ch, kernel_size=kernel_size)
        total = kernel_size - 1
        before, after = total // 2, total - total // 2
        self.pad = (before, after) * dims  # F.pad order: last axis first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(F.pad(x, self.pad)))


class UpBlock(nn.Module):
    """Decoder step: ×2 nearest upsampling, 2×2 'same' conv + ReLU, concat skip, ConvBlock.

    Shapes: ``x [N, C_in, (D,) h, w]`` and ``skip [N, C_skip, (D,) 2h, 2w]`` ->
    ``[N, C_out, (D,) 2h, 2w]``. In 3D only H and W are upsampled (the 3D UNet
    keeps its depth).
    """

    def __init__(
        self, in_ch: int, skip_ch: int, out_ch: int, dims: int = 2, batch_norm: bool = True
    ) -> None:
        super().__init__()
        scale: tuple[float, ...] = (2.0, 2.0) if dims == 2 else (1.0, 2.0, 2.0)
        self.up = nn.Upsample(scale_factor=scale, mode="nearest")
        self.reduce = SamePadConv(in_ch, out_ch, kernel_size=2, dims=dims)
        self.block = ConvBlock(skip_ch + out_ch, out_ch, dims=dims, batch_norm=batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Keras concatenates [skip, up] in this order; keep it so weights map 1:1.
        return self.block(torch.cat([skip, self.reduce(self.up(x))], dim=1))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al.) as in the authors' code: no biases, ratio 16.

    Shapes: ``[N, C, H, W] -> [N, C, H, W]``.
    """

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        hidden = channels // ratio
        if hidden < 1:
            raise ValueError(f"SE block needs channels >= ratio ({channels} < {ratio})")
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w[:, :, None, None]


class DimensionFusion(nn.Module):
    """The dimension transform block (paper Fig. 2b, Eq. 1–2).

    The 3D feature map is reduced to one channel by a ``1×1×1`` conv, its depth
    becomes the channel axis, and a ``3×3`` conv + ReLU brings it to the 2D
    branch's width. With ``se=True`` both branches are re-weighted by their own
    SE block before the addition (SEAdd); otherwise they are simply added (Add).

    Shapes: ``x3d [N, C3, D, H, W]`` and ``x2d [N, C, H, W]`` -> ``[N, C, H, W]``.
    """

    def __init__(self, channels_3d: int, depth: int, channels: int, se: bool) -> None:
        super().__init__()
        self.reduce3d = nn.Conv3d(channels_3d, 1, kernel_size=1)
        self.to2d = nn.Conv2d(depth, channels, kernel_size=3, padding=1)
        self.se3d: nn.Module = SqueezeExcite(channels) if se else nn.Identity()
        self.se2d: nn.Module = SqueezeExcite(channels) if se else nn.Identity()

    def forward(self, x3d: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        t = self.reduce3d(x3d).squeeze(1)  # [N, D, H, W]: depth becomes channels
        t = F.relu(self.to2d(t))
        return self.se3d(t) + self.se2d(x2d)
