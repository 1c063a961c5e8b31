"""Denoising networks and their registry.

Every denoiser maps a batch of normalised slices ``x`` of shape ``(N, 1, H, W)`` to ``x - r(x)``: it predicts the
noise ``r(x)`` (residual learning) and its last layer starts at zero, so a freshly built network, or one whose
residual is zero, is an exact identity. Denoisers take any ``H, W`` (networks with down-sampling pad internally
and crop back) and state how the inference engine should tile them:

``size_multiple``
    tile origins must be multiples of this for tiled and whole-image results to agree;
``receptive_radius``
    pixels beyond which the input cannot change an output pixel (the theoretical receptive field's radius).

Architectures (build with :func:`build_network`; FLOPs count a multiply-add as 2 and are for one 512x512 slice,
measured with :func:`count_flops`):

========================  ==============================================  ==========  ===============
name                      what                                            parameters  GFLOP per slice
========================  ==============================================  ==========  ===============
``red-cnn``               RED-CNN (Chen et al. 2017), 96 ch, 5x5 kernels  1.85 M      917
``unet-res``              residual U-Net, 32-64-128-256 ch, 2 blocks      4.26 M      142
``unet-res-small``        CPU variant: 2x unshuffle, 32-64-128, 1 block   0.56 M      13.5
``gan-generator``         GAN generator: ``unet-res`` (same weights)      4.26 M      142
``patch-critic``          PatchGAN critic (WGAN-GP: no batch norm)        2.76 M      25.4 (training)
========================  ==============================================  ==========  ===============

The GAN generator shares ``unet-res``'s class and arguments, so adversarial training starts from the CNN's
weights (DESIGN.md, Models and training).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOGGER = logging.getLogger(__name__)

#: Architecture name -> builder; filled by :func:`register_architecture`.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
#: Names of architectures that denoise (as opposed to critics used only in training).
DENOISERS: set[str] = set()


class UnknownArchitecture(KeyError):
    """``build_network`` was asked for a name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def register_architecture(
    name: str, *, denoiser: bool = True
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder under ``name`` (a decorator).

    Parameters
    ----------
    name
        The architecture name written in model cards.
    denoiser
        ``False`` for networks that do not denoise (critics); the loader refuses to run them on images.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        if denoiser:
            DENOISERS.add(name)
        return builder

    return decorate


def build_network(architecture: str, **arguments: Any) -> nn.Module:
    """Build the network called ``architecture`` with keyword ``arguments`` (as stored in a model card).

    Raises
    ------
    UnknownArchitecture
        When ``architecture`` is not registered (the message lists the known names).
    TypeError
        When an argument is not accepted by the architecture.
    """
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitecture(f"unknown architecture {architecture!r} (known: {known})") from None
    return builder(**arguments)


def architecture_names(denoisers_only: bool = False) -> list[str]:
    """Sorted names of the registered architectures."""
    return sorted(DENOISERS if denoisers_only else ARCHITECTURES)


# ---------------------------------------------------------------------------------------------------------------
# RED-CNN
# ---------------------------------------------------------------------------------------------------------------


class REDCNN(nn.Module):
    """Residual encoder-decoder CNN (RED-CNN; Chen et al., IEEE TMI 36(12), 2017).

    Five valid 5x5 convolutions, five 5x5 transposed convolutions and three shortcuts, as in the paper, except
    that the last layer predicts the noise (``y = x - r(x)``, no final ReLU, so normalised values may be
    negative) and starts at zero.

    With the defaults (``channels=96, kernel_size=5``): 1.85 M parameters, 917 GFLOP per 512x512 slice. A GPU
    model: about 0.15 slices/s on a 2-core CPU.

    Parameters
    ----------
    channels
        Feature channels of every hidden layer.
    kernel_size
        Kernel size of every layer (odd).
    """

    size_multiple = 1

    def __init__(self, channels: int = 96, kernel_size: int = 5) -> None:
        super().__init__()
        if channels < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError("channels must be >= 1 and kernel_size a positive odd number")
        k = kernel_size
        self.encoder = nn.ModuleList(
            [nn.Conv2d(1, channels, k)] + [nn.Conv2d(channels, channels, k) for _ in range(4)]
        )
        decoder = [nn.ConvTranspose2d(channels, channels, k) for _ in range(4)] + [nn.ConvTranspose2d(channels, 1, k)]
        self.decoder = nn.ModuleList(decoder)
        self.receptive_radius = 10 * (k - 1) // 2 * 2  # encoder + decoder
        self.min_size = 5 * (k - 1) + 1
        nn.init.zeros_(decoder[-1].weight)
        if decoder[-1].bias is not None:  # always: the layers are built with bias
            nn.init.zeros_(decoder[-1].bias)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted noise ``r(x)``."""
        h = x
        if h.shape[-1] < self.min_size or h.shape[-2] < self.min_size:
            raise ValueError(f"RED-CNN needs images of at least {self.min_size}x{self.min_size} pixels")
        h = F.relu(self.encoder[0](h))
        h = F.relu(self.encoder[1](h))
        skip2 = h
        h = F.relu(self.encoder[2](h))
        h = F.relu(self.encoder[3](h))
        skip3 = h
        h = F.relu(self.encoder[4](h))
        h = self.decoder[0](h) + skip3
        h = self.decoder[1](F.relu(h))
        h = self.decoder[2](F.relu(h)) + skip2
        h = self.decoder[3](F.relu(h))
        return self.decoder[4](F.relu(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.residual(x)


@register_architecture("red-cnn")
def _build_red_cnn(channels: int = 96, kernel_size: int = 5) -> nn.Module:
    """RED-CNN: 1.85 M parameters, 917 GFLOP per 512x512 slice (a GPU model)."""
    return REDCNN(channels=channels, kernel_size=kernel_size)


# ---------------------------------------------------------------------------------------------------------------
# Residual U-Net
# ---------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a ReLU between them and an identity shortcut (no normalisation)."""

    def __init__(self, channels: int, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ResUNet(nn.Module):
    """Residual U-Net denoiser in the DRUNet style (Zhang et al., TPAMI 2022), sized for CT slices.

    Levels of residual blocks at 1, 1/2, 1/4, ... resolution; 2x2 strided convolutions down, 2x2 transposed
    convolutions up, additive skips (cheaper than concatenation), no normalisation layers (their statistics would
    depend on the batch and the tile). Inputs whose size is not a multiple of ``2 ** (levels - 1)`` are padded by
    replication and cropped back.

    Parameters
    ----------
    channels
        Feature channels per level, finest first; the number of levels is ``len(channels)``.
    blocks
        Residual blocks per level in the encoder and in the decoder (the bottom level has ``blocks`` in all).
    bias
        Whether convolutions have biases.
    in_channels, out_channels
        Image channels in and out: 1 and 1 for a grey slice; 3 and 3 for colour; ``(2k + 1) * c`` in and ``c`` out
        for a frame with ``k`` neighbours on each side (frames in order, each frame's ``c`` samples together).
        The output is the centre frame minus the predicted residual, so the network still learns only noise.

    Notes
    -----
    ``unet-res`` (``channels=(32, 64, 128, 256), blocks=2``): 4.26 M parameters, 142 GFLOP per 512x512 slice.
    ``unet-res-small`` (``channels=(32, 64, 128), blocks=1, unshuffle=2``): 0.56 M parameters, 13.5 GFLOP per
    slice; ``unshuffle`` > 1 folds ``unshuffle x unshuffle`` pixel blocks into channels first (FFDNet's trick),
    which keeps narrow full-resolution layers, slow on CPUs, out of the network.
    """

    def __init__(self, channels: tuple[int, ...] | list[int] = (32, 64, 128, 256), blocks: int = 2,
                 bias: bool = True, unshuffle: int = 1, in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        if unshuffle < 1:
            raise ValueError("unshuffle must be >= 1")
        if out_channels < 1 or in_channels < out_channels or in_channels % out_channels \
                or (in_channels // out_channels) % 2 == 0:
            raise ValueError("in_channels must be an odd multiple (2k + 1) of out_channels")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        # The centre frame's channels: what the residual is subtracted from.
        self.centre = slice((in_channels - out_channels) // 2, (in_channels + out_channels) // 2)
        self.unshuffle = int(unshuffle)
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1 or min(channels) < 1 or blocks < 1:
            raise ValueError("channels must be a non-empty list of positive integers and blocks >= 1")
        self.channels = channels
        self.levels = len(channels)
        self.size_multiple = 2 ** (self.levels - 1) * self.unshuffle
        u2 = self.unshuffle**2
        self.head = nn.Conv2d(u2 * self.in_channels, channels[0], 3, padding=1, bias=bias)
        self.down_blocks = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in range(self.levels - 1):
            c, c_next = channels[level], channels[level + 1]
            self.down_blocks.append(nn.Sequential(*[ResBlock(c, bias) for _ in range(blocks)]))
            self.downs.append(nn.Conv2d(c, c_next, 2, stride=2, bias=bias))
            self.ups.append(nn.ConvTranspose2d(c_next, c, 2, stride=2, bias=bias))
            self.up_blocks.append(nn.Sequential(*[ResBlock(c, bias) for _ in range(blocks)]))
        self.bottom = nn.Sequential(*[ResBlock(channels[-1], bias) for _ in range(blocks)])
        self.tail = nn.Conv2d(channels[0], u2 * self.out_channels, 3, padding=1, bias=bias)
        nn.init.zeros_(self.tail.weight)
        if self.tail.bias is not None:
            nn.init.zeros_(self.tail.bias)
        self.receptive_radius = self._radius(blocks) * self.unshuffle

    def _radius(self, blocks: int) -> int:
        """Theoretical receptive-field radius in input pixels."""
        radius = 1 + 1  # head and tail
        for level in range(self.levels):
            scale = 2**level
            per_block = 2 * scale  # two 3x3 convolutions at this scale
            convs = blocks if level == self.levels - 1 else 2 * blocks
            radius += convs * per_block
            if level < self.levels - 1:
                radius += 2 * scale  # down and up convolutions (2x2)
        return radius

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The predicted noise ``r(x)``."""
        h_in, w_in = x.shape[-2:]
        m = self.size_multiple
        pad_h, pad_w = (-h_in) % m, (-w_in) % m
        if pad_h or pad_w:
            mode = "replicate" if h_in > 1 and w_in > 1 else "constant"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        h = self.head(x)
        skips = []
        for block, down in zip(self.down_blocks, self.downs):
            h = block(h)
            skips.append(h)
            h = down(h)
        h = self.bottom(h)
        for up, block, skip in zip(reversed(self.ups), reversed(self.up_blocks), reversed(skips)):
            h = block(up(h) + skip)
        r = self.tail(h)
        if self.unshuffle > 1:
            r = F.pixel_shuffle(r, self.unshuffle)
        return r[..., :h_in, :w_in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.centre] - self.residual(x)


@register_architecture("unet-res")
def _build_unet_res(channels: tuple[int, ...] | list[int] = (32, 64, 128, 256), blocks: int = 2,
                    bias: bool = True, unshuffle: int = 1, in_channels: int = 1, out_channels: int = 1) -> nn.Module:
    """The main CNN: 4.26 M parameters, 142 GFLOP per 512x512 slice (RED-CNN: 917)."""
    return ResUNet(channels=channels, blocks=blocks, bias=bias, unshuffle=unshuffle, in_channels=in_channels,
                   out_channels=out_channels)


@register_architecture("unet-res-small")
def _build_unet_res_small(channels: tuple[int, ...] | list[int] = (32, 64, 128), blocks: int = 1,
                          bias: bool = True, unshuffle: int = 2, in_channels: int = 1,
                          out_channels: int = 1) -> nn.Module:
    """The CPU variant: a 2x pixel-unshuffle stem (as in FFDNet) then three levels at 1/2, 1/4, 1/8 resolution.

    0.56 M parameters, 13.5 GFLOP per 512x512 slice.
    """
    return ResUNet(channels=channels, blocks=blocks, bias=bias, unshuffle=unshuffle, in_channels=in_channels,
                   out_channels=out_channels)


@register_architecture("gan-generator")
def _build_gan_generator(channels: tuple[int, ...] | list[int] = (32, 64, 128, 256), blocks: int = 2,
                         bias: bool = True, unshuffle: int = 1, in_channels: int = 1,
                         out_channels: int = 1) -> nn.Module:
    """The GAN's generator: a :class:`ResUNet` with ``unet-res``'s defaults, so it loads the CNN's weights.

    4.26 M parameters, 142 GFLOP per 512x512 slice.
    """
    return ResUNet(channels=channels, blocks=blocks, bias=bias, unshuffle=unshuffle, in_channels=in_channels,
                   out_channels=out_channels)


# ---------------------------------------------------------------------------------------------------------------
# Critic
# ---------------------------------------------------------------------------------------------------------------


class PatchCritic(nn.Module):
    """PatchGAN critic (Isola et al. 2017) for WGAN-GP training (Gulrajani et al. 2017).

    4x4 convolutions with stride 2 (``layers`` times), one with stride 1 and a 1-channel 4x4 output layer; each
    output value scores one patch (70x70 pixels with the defaults). No batch normalisation: the gradient penalty
    is defined per sample, so the default is no normalisation (``norm="instance"`` or ``"layer"`` are offered).
    Used only by training; the node never runs it.

    Parameters
    ----------
    in_channels
        1 for an unconditional critic; 2 to score ``(noisy, denoised)`` pairs.
    channels
        Channels of the first layer (doubling per layer, at most 8x).
    layers
        Number of stride-2 layers.
    norm
        ``"none"``, ``"instance"`` or ``"layer"`` (GroupNorm with one group).

    Notes
    -----
    Defaults: 2.76 M parameters, 25.4 GFLOP per 512x512 slice (training only).
    """

    is_critic = True

    def __init__(self, in_channels: int = 1, channels: int = 64, layers: int = 3, norm: str = "none") -> None:
        super().__init__()
        if norm not in {"none", "instance", "layer"}:
            raise ValueError(f"norm must be none, instance or layer, not {norm!r}")
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods.append(nn.Conv2d(c, c_out, 4, stride=stride, padding=1, bias=norm == "none"))
            if norm == "instance":
                mods.append(nn.InstanceNorm2d(c_out, affine=True))
            elif norm == "layer":
                mods.append(nn.GroupNorm(1, c_out))
            mods.append(nn.LeakyReLU(0.2))
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch scores of shape ``(N, 1, h, w)`` (higher: more like clean images)."""
        return self.net(x)


@register_architecture("patch-critic", denoiser=False)
def _build_patch_critic(in_channels: int = 1, channels: int = 64, layers: int = 3, norm: str = "none") -> nn.Module:
    """PatchGAN critic: 2.76 M parameters, 25.4 GFLOP per 512x512 slice (training only)."""
    return PatchCritic(in_channels=in_channels, channels=channels, layers=layers, norm=norm)


# ---------------------------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------------------------


def count_parameters(network: nn.Module) -> int:
    """Number of trainable and frozen parameters."""
    return sum(p.numel() for p in network.parameters())


def count_flops(network: nn.Module, height: int = 512, width: int = 512) -> int:
    """FLOPs of one forward pass on a ``(1, 1, height, width)`` input (a multiply-add counts as 2).

    Counts convolutions and transposed convolutions (everything else is negligible for these networks) by running
    a copy of the network once on the shape-only "meta" device with forward hooks.
    """
    total = 0

    def conv_hook(module: nn.Conv2d | nn.ConvTranspose2d, inputs: tuple[torch.Tensor, ...],
                  output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        cin_per_group = module.in_channels // module.groups
        if isinstance(module, nn.Conv2d):
            positions = output.shape[0] * output.shape[2] * output.shape[3]
            macs = positions * module.out_channels * cin_per_group * kh * kw
        else:  # each input position scatters into kh*kw outputs per output channel
            inp = inputs[0]
            positions = inp.shape[0] * inp.shape[2] * inp.shape[3]
            macs = positions * module.in_channels * (module.out_channels // module.groups) * kh * kw
        total += 2 * macs

    # Count on the "meta" device: shapes only, no arithmetic, so even RED-CNN is counted in milliseconds.
    probe = copy.deepcopy(network).to("meta")
    handles = [m.register_forward_hook(conv_hook) for m in probe.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.inference_mode():
            probe(torch.zeros(1, 1, height, width, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total


def describe(network: nn.Module, height: int = 512, width: int = 512) -> dict[str, float]:
    """Parameters and GFLOP per slice of ``network``, for cards, ``models show`` and the benchmark."""
    return {"parameters": count_parameters(network), "gflop_per_slice": count_flops(network, height, width) / 1e9}


def is_denoiser(architecture: str) -> bool:
    """Whether ``architecture`` is a registered denoiser (not a critic)."""
    return architecture in DENOISERS


def receptive_radius(network: nn.Module) -> int:
    """The network's receptive-field radius in pixels (``math.inf`` cast to a large int when unknown)."""
    return int(getattr(network, "receptive_radius", 10**6))


def size_multiple(network: nn.Module) -> int:
    """The tile-origin multiple that keeps tiled results equal to whole-image results."""
    return int(getattr(network, "size_multiple", 1))

