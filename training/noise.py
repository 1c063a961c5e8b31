"""Physically based noise simulation for making low-dose training pairs.

CT
    Parallel-beam simulation in the projection domain (after Yu et al., "Development and validation of a
    practical lower-dose-simulation tool", Med. Phys. 2012, and Zeng et al. 2015). The slice is converted from HU
    to linear attenuation (``mu = mu_water * (1 + HU / 1000)``), forward-projected into line integrals ``p``,
    and expected counts ``I = d * I0 * exp(-p)`` get Poisson quantum noise plus Gaussian electronic noise
    (pre-log). The log is taken, the clean line integrals are subtracted, and only that difference is
    reconstructed by filtered back-projection (ramp filter with a window that stands in for the scanner's
    kernel). The result is noise with the spatial correlation (noise power spectrum) and the spatial
    non-stationarity (more noise behind dense, wide paths) of real CT noise, not white noise.

    The scan already carries the noise of its own dose, so the noise added to reach a dose fraction ``d`` is the
    *extra* variance: ``(1/d - 1)`` times the full-dose variance. Poisson noise at ``d * I0`` has variance
    ``1 / (d I0 e^-p)``; scaling it by ``sqrt(1 - d)`` gives ``(1 - d) / (d I0 e^-p)`` exactly (the electronic
    term is scaled the same way, an approximation).

    ``I0`` (incident photons per detector bin and view of *this* simulator's geometry, at the scan's own dose) is
    not written in DICOM. It is calibrated from the image: :func:`calibrate_flux` picks the ``I0`` for which the
    simulator's full-dose noise SD in flat regions equals the noise SD measured in the same regions of the
    scan. ``training/README.md`` shows the check against the two Philips phantom doses.

MR
    Rician noise on a magnitude image: ``|m + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma^2)``.

X-ray
    Poisson-Gaussian: the image is taken as proportional to detected quanta, ``gain * Poisson(x / gain) +
    N(0, sigma_e^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Linear attenuation of water at about 70 keV (the effective energy of a 120 kVp beam), per mm.
MU_WATER_PER_MM = 0.0192


# --------------------------------------------------------------------------------------------------------------
# CT: projector and filtered back-projection (parallel beam)
# --------------------------------------------------------------------------------------------------------------


def _ramp_filter(n_det: int, ds: float, window: str, cutoff: float) -> torch.Tensor:
    """Frequency response of the discrete ramp filter (Kak & Slaney) times an apodisation window.

    Returned for an FFT of length ``2 * next_pow2(n_det)``; multiply with ``torch.fft.rfft`` of the zero-padded
    projections.
    """
    size = 1 << int(math.ceil(math.log2(2 * n_det)))
    n = torch.arange(size, dtype=torch.float64)
    n = torch.where(n > size // 2, n - size, n)
    h = torch.zeros(size, dtype=torch.float64)
    h[0] = 1.0 / (4 * ds * ds)
    odd = (n.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi**2 * n[odd] ** 2 * ds * ds)
    response = torch.fft.rfft(h).real * ds  # ds: the integral over s'
    freq = torch.fft.rfftfreq(size, d=1.0)  # cycles per sample, 0 .. 0.5
    x = (freq / (0.5 * cutoff)).clamp(max=1.0)
    if window == "ramp":
        w = torch.ones_like(freq)
    elif window == "shepp-logan":
        w = torch.sinc(x / 2)
    elif window == "cosine":
        w = torch.cos(x * math.pi / 2)
    elif window == "hann":
        w = 0.5 * (1 + torch.cos(math.pi * x))
    else:
        raise ValueError(f"unknown FBP window {window!r} (ramp, shepp-logan, cosine, hann)")
    w = torch.where(freq > 0.5 * cutoff, torch.zeros_like(w), w)
    return (response * w).to(torch.float32)


@dataclass(frozen=True)
class ParallelBeam:
    """A parallel-beam geometry over 180 degrees for an ``n x n`` slice with square pixels.

    Detector bins have the pixel size; ``projection_downsample`` projects the (smooth) attenuation map on a
    coarser grid to save time (counts vary slowly), then interpolates the sinogram back to full sampling.
    """

    n_views: int = 360
    window: str = "hann"
    cutoff: float = 1.0
    projection_downsample: int = 2
    cpu_tile: int = 64  # back-project a CPU image in tiles of this side (0: at once)

    def angles(self, device=None) -> torch.Tensor:
        return torch.arange(self.n_views, dtype=torch.float32, device=device) * (math.pi / self.n_views)

    # -- forward projection ------------------------------------------------------------------------------------
    def project(self, mu: torch.Tensor, pixel_mm: float) -> torch.Tensor:
        """Line integrals of ``mu`` (per mm), ``(H, W) -> (n_views, n_det)`` with ``n_det = ceil(sqrt2 * max(H,W))``.

        Rotate-and-sum with ``grid_sample``; zero outside the image.
        """
        h, w = mu.shape
        n = max(h, w)
        n_det = int(math.ceil(n * math.sqrt(2))) | 1
        k = max(1, int(self.projection_downsample))
        img = mu[None, None]
        if k > 1:
            img = F.avg_pool2d(img, k, ceil_mode=True)
        hs, ws = img.shape[-2:]
        step = pixel_mm * k
        n_det_c = int(math.ceil(n_det / k)) | 1
        n_ray = n_det_c
        # Coordinates in mm, centred on the image centre.
        dev = mu.device  # follows its input: the same code projects on the CPU or on a GPU
        s = (torch.arange(n_det_c, dtype=torch.float32, device=dev) - (n_det_c - 1) / 2) * step
        t = (torch.arange(n_ray, dtype=torch.float32, device=dev) - (n_ray - 1) / 2) * step
        theta = self.angles(dev)
        out = torch.empty(self.n_views, n_det_c, device=dev)
        half_w = (ws - 1) * step / 2  # align_corners=True: -1 and +1 are the outer pixel centres
        half_h = (hs - 1) * step / 2
        chunk = 30
        for start in range(0, self.n_views, chunk):
            th = theta[start:start + chunk]
            c, si = torch.cos(th)[:, None, None], torch.sin(th)[:, None, None]
            ss, tt = s[None, None, :], t[None, :, None]
            x = ss * c - tt * si  # (views, rays, det)
            y = ss * si + tt * c
            grid = torch.stack([x / half_w, y / half_h], dim=-1)
            sampled = F.grid_sample(
                img.expand(len(th), -1, -1, -1), grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )
            out[start:start + len(th)] = sampled[:, 0].sum(dim=1) * step
        if k > 1:
            out = F.interpolate(out[None, None], size=(self.n_views, n_det), mode="bilinear", align_corners=True)[0, 0]
        return out

    # -- filtered back-projection ------------------------------------------------------------------------------
    def filter(self, sino: torch.Tensor, pixel_mm: float) -> torch.Tensor:
        n_det = sino.shape[-1]
        response = _ramp_filter(n_det, pixel_mm, self.window, self.cutoff).to(sino.device)
        size = (response.shape[0] - 1) * 2
        spec = torch.fft.rfft(F.pad(sino, (0, size - n_det)), dim=-1)
        return torch.fft.irfft(spec * response, n=size, dim=-1)[..., :n_det]

    def backproject(self, q: torch.Tensor, shape: tuple[int, int], pixel_mm: float,
                    roi: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """``(n_views, n_det) -> (H, W)``: ``(pi / n_views) * sum_k q_k(x cos t_k + y sin t_k)``.

        ``roi = (row, column, rows, columns)``: reconstruct only that window of the ``shape`` image (the cost is
        proportional to the pixels reconstructed: a 64x64 window of a 512x512 slice is 64 times cheaper).
        """
        h_full, w_full = shape
        y0, x0, h, w = roi if roi is not None else (0, 0, h_full, w_full)
        tile = self.cpu_tile
        if q.device.type == "cpu" and tile and h * w > tile * tile:
            # On a CPU, 64x64 tiles keep the per-view tensors in cache: a 512x512 slice about 4x faster.
            out = torch.empty(h, w, dtype=q.dtype)
            for ty in range(0, h, tile):
                for tx in range(0, w, tile):
                    tile_h, tile_w = min(tile, h - ty), min(tile, w - tx)
                    out[ty:ty + tile_h, tx:tx + tile_w] = self.backproject(q, shape, pixel_mm,
                                                                           (y0 + ty, x0 + tx, tile_h, tile_w))
            return out
        n_views, n_det = q.shape
        dev = q.device
        x = (torch.arange(x0, x0 + w, dtype=torch.float32, device=dev) - (w_full - 1) / 2) * pixel_mm
        y = (torch.arange(y0, y0 + h, dtype=torch.float32, device=dev) - (h_full - 1) / 2) * pixel_mm
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        theta = self.angles(dev)
        half = (n_det - 1) / 2 * pixel_mm
        image = torch.zeros(h * w, device=dev)
        chunk = 24
        for start in range(0, n_views, chunk):
            th = theta[start:start + chunk]
            s = xx.reshape(1, -1) * torch.cos(th)[:, None] + yy.reshape(1, -1) * torch.sin(th)[:, None]
            # One row of the sinogram per view: sample q[view] at s with linear interpolation.
            pos = (s / half + 1) * (n_det - 1) / 2
            lo = pos.floor().clamp(0, n_det - 2)
            frac = (pos - lo).clamp(0, 1)
            lo = lo.long()
            rows = q[start:start + len(th)]
            v0 = torch.gather(rows, 1, lo)
            v1 = torch.gather(rows, 1, lo + 1)
            image += ((1 - frac) * v0 + frac * v1).sum(0)
        return (image * (math.pi / n_views)).reshape(h, w)

    def fbp(self, sino: torch.Tensor, shape: tuple[int, int], pixel_mm: float,
            roi: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        return self.backproject(self.filter(sino, pixel_mm), shape, pixel_mm, roi)


def hu_to_mu(hu: torch.Tensor, mu_water: float = MU_WATER_PER_MM) -> torch.Tensor:
    return (mu_water * (1.0 + hu / 1000.0)).clamp(min=0.0)


@dataclass
class CTNoiseSimulator:
    """Low-dose CT noise in the projection domain; see the module docstring.

    Parameters
    ----------
    geometry:
        The parallel-beam projector and its FBP window (the window shapes the noise power spectrum).
    electronic_sd:
        SD of the Gaussian electronic noise, in quanta per bin and view.
    mu_water:
        Attenuation of water per mm used for HU <-> mu.
    bowtie_edge:
        Transmission of the bowtie filter at the edge of ``bowtie_fov_mm`` relative to the centre (1: no bowtie).
        The profile is ``bowtie_edge ** min(1, (2 s / fov)^2)`` over the detector position ``s``: the periphery of
        the body gets fewer quanta, as on a scanner, so noise there rises and streaks along long paths widen.
    bowtie_fov_mm:
        Field of view the bowtie is shaped for (about 500 mm body, 250 mm head).
    tcm_strength:
        Tube current modulation over the views (as a scanner's automatic exposure control modulates it): the
        current of a view is proportional to ``A ** tcm_strength``, ``A = exp(p_max)`` the attenuation along the
        view's most attenuating ray, normalised to a mean of 1 so the dose is unchanged. 0: constant current;
        0.5: the noise-optimal modulation (Gies et al., Med. Phys. 1999). Without it an oval body gets its noise
        from the few lateral views, in streaks along its long axis; with it the noise is more isotropic.
    electronic_model:
        How the noise added to reach a dose fraction ``d`` is made. ``"variance"`` (physical): counts at
        ``d * I0`` with Poisson noise plus electronic noise of a fixed SD (which therefore dominates at low
        flux), post-log, scaled per ray so that its variance is the *difference* between the variance at dose
        ``d`` and the variance the scan already has (Yu et al. 2012). ``"scaled"`` (the original simulator):
        the noise at ``d * I0`` scaled by ``sqrt(1 - d)``, exact for quantum noise only.
    """

    geometry: ParallelBeam = ParallelBeam()
    electronic_sd: float = 10.0
    mu_water: float = MU_WATER_PER_MM
    bowtie_edge: float = 1.0
    bowtie_fov_mm: float = 500.0
    tcm_strength: float = 0.0
    electronic_model: str = "scaled"

    def __post_init__(self) -> None:
        if not 0.0 < self.bowtie_edge <= 1.0:
            raise ValueError(f"bowtie_edge must be in (0, 1], not {self.bowtie_edge}")
        if not 0.0 <= self.tcm_strength <= 1.0:
            raise ValueError(f"tcm_strength must be in [0, 1], not {self.tcm_strength}")
        if self.electronic_model not in ("scaled", "variance"):
            raise ValueError(f"electronic_model must be 'scaled' or 'variance', not {self.electronic_model!r}")

    def line_integrals(self, hu: torch.Tensor, pixel_mm: float) -> torch.Tensor:
        return self.geometry.project(hu_to_mu(hu, self.mu_water), pixel_mm)

    def bowtie(self, n_det: int, pixel_mm: float, device=None) -> torch.Tensor:
        """Relative transmission of the bowtie filter per detector bin (1 at the centre)."""
        s = (torch.arange(n_det, dtype=torch.float32, device=device) - (n_det - 1) / 2) * pixel_mm
        r = (2.0 * s / self.bowtie_fov_mm).abs().clamp(max=1.0)
        return self.bowtie_edge ** (r * r)

    def view_current(self, p: torch.Tensor) -> torch.Tensor:
        """Relative tube current per view (mean 1): ``exp(tcm_strength * p_max(view))`` normalised."""
        if self.tcm_strength == 0.0:
            return torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
        p_max = torch.quantile(p, 0.98, dim=1)  # the most attenuating rays, robust to a single bin
        m = torch.exp(self.tcm_strength * (p_max - p_max.max()))
        return m / m.mean()

    def expected_counts(self, p: torch.Tensor, flux: float, dose_fraction: float,
                        pixel_mm: float = 1.0) -> torch.Tensor:
        """Expected detected quanta per bin and view: ``d * I0 * tcm(view) * bowtie(bin) * exp(-p)``
        (``pixel_mm``: the detector bin size, which places the bowtie)."""
        n_det = p.shape[1]
        shape = (dose_fraction * flux) * torch.exp(-p)
        if self.bowtie_edge < 1.0:
            shape = shape * self.bowtie(n_det, pixel_mm, p.device)[None, :]
        if self.tcm_strength > 0.0:
            shape = shape * self.view_current(p)[:, None]
        return shape

    def projection_noise(
        self, p: torch.Tensor, flux: float, dose_fraction: float, generator: torch.Generator | None,
        pixel_mm: float = 1.0,
    ) -> torch.Tensor:
        """Noise on the post-log line integrals for counts at ``dose_fraction * flux`` (not yet scaled).

        The counts are drawn on the generator's device and the result is returned on ``p``'s: a seed gives the
        same noise whether the projections and the FBP run on the CPU or on a GPU.
        """
        where = p.device
        if generator is not None:
            p = p.to(generator.device)
        expected = self.expected_counts(p, flux, dose_fraction, pixel_mm)
        counts = torch.poisson(expected, generator=generator)
        if self.electronic_sd > 0:
            counts = counts + self.electronic_sd * torch.randn(counts.shape, generator=generator, device=p.device)
        counts = counts.clamp(min=1.0)  # photon starvation: the scanner's pre-log floor
        return (torch.log(expected.clamp(min=1e-6)) - torch.log(counts)).to(where)

    def _variance(self, expected: torch.Tensor) -> torch.Tensor:
        """Post-log variance of a ray with ``expected`` quanta (quantum plus electronic; first order)."""
        e = expected.clamp(min=1e-6)
        return (e + self.electronic_sd ** 2) / (e * e)

    def full_dose_noise(
        self, hu: torch.Tensor, pixel_mm: float, flux: float, generator: torch.Generator | None = None,
        p: torch.Tensor | None = None, roi: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """Noise (HU) a scan at flux ``flux`` would carry; used for calibration."""
        if p is None:
            p = self.line_integrals(hu, pixel_mm)
        delta = self.projection_noise(p, flux, 1.0, generator, pixel_mm)
        return self.geometry.fbp(delta, (hu.shape[0], hu.shape[1]), pixel_mm, roi) * (1000.0 / self.mu_water)

    def added_noise(
        self, hu: torch.Tensor, pixel_mm: float, flux: float, dose_fraction: float,
        generator: torch.Generator | None = None, p: torch.Tensor | None = None,
        roi: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """Noise (HU) to add to a scan at flux ``flux`` so that it looks like ``dose_fraction`` of its dose.

        ``roi = (row, column, rows, columns)`` returns only that window (reconstructed alone, much faster).
        """
        if not 0.0 < dose_fraction <= 1.0:
            raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
        if dose_fraction == 1.0:
            zeros = torch.zeros_like(hu)
            return zeros if roi is None else zeros[roi[0]:roi[0] + roi[2], roi[1]:roi[1] + roi[3]]
        if p is None:
            p = self.line_integrals(hu, pixel_mm)
        delta = self.projection_noise(p, flux, dose_fraction, generator, pixel_mm)
        if self.electronic_model == "variance":
            full = self.expected_counts(p, flux, 1.0, pixel_mm)
            low = full * dose_fraction
            keep = (1.0 - self._variance(full) / self._variance(low)).clamp(min=0.0)
            delta = delta * torch.sqrt(keep).to(delta.device)
        else:
            delta = delta * math.sqrt(1.0 - dose_fraction)
        return self.geometry.fbp(delta, (hu.shape[0], hu.shape[1]), pixel_mm, roi) * (1000.0 / self.mu_water)

    def simulate(self, hu, pixel_mm, flux, dose_fraction, generator=None):
        """``hu`` plus :meth:`added_noise`: the same slice at ``dose_fraction`` of its dose."""
        return hu + self.added_noise(hu, pixel_mm, flux, dose_fraction, generator)


# --------------------------------------------------------------------------------------------------------------
# Reconstruction kernels
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """A reconstruction kernel stood in for by an FBP window (``hann``, ``cosine``, ``shepp-logan`` or ``ramp``,
    smooth to sharp) reaching zero at ``cutoff_per_mm`` (cycles/mm), so that the noise texture does not depend on
    the pixel size of the slice it is applied to; a cutoff above the grid's Nyquist frequency means its full
    bandwidth.

    ``nps_mean_freq`` is the mean frequency (cycles/mm) of the noise power spectrum measured on the real series
    the kernel was matched to (``python -m training.noise_check`` measures both and prints the table).
    """

    name: str
    cutoff_per_mm: float
    matched_to: str = ""
    nps_mean_freq: float | None = None
    window: str = "hann"

    def cutoff_fraction(self, pixel_mm: float) -> float:
        """The window's cutoff as a fraction of the Nyquist frequency of a ``pixel_mm`` grid (at most 1)."""
        return float(min(1.0, max(0.05, self.cutoff_per_mm * 2.0 * pixel_mm)))


#: Kernels from smooth to sharp. The named ones were matched to real series in ../shared/data/ct by the mean
#: frequency of the noise power spectrum in flat regions (``python -m training.noise_check --parts kernels``,
#: 2026-12-04: measured mean frequency in cycles/mm and pixel size in the comments); ``smooth`` and ``sharp`` widen
#: the family beyond them. A cutoff above the Nyquist frequency of a slice means the full bandwidth there.
KERNELS: dict[str, Kernel] = {}


def register_kernels(*kernels: Kernel) -> None:
    """Add kernels to :data:`KERNELS` (a site may register its own scanners' kernels)."""
    for k in kernels:
        KERNELS[k.name] = k


register_kernels(
    Kernel("smooth", 0.28, "smoother than every real series here (iterative reconstructions look like this)"),
    Kernel("philips-ub", 0.35, "Philips UB head phantom, 2.5 mm, 0.48 mm pixels", 0.188),
    Kernel("toshiba-fc17", 0.46, "Toshiba Aquilion ONE FC17 body axial, 0.62 mm pixels", 0.215),
    Kernel("toshiba-fc07", 0.52, "Toshiba Aquilion ONE FC07 body MPR, 0.62 mm pixels", 0.238),
    Kernel("ge-standard", 0.57, "GE LightSpeed VCT STANDARD body axial, 0.64-0.94 mm pixels", 0.240),
    Kernel("ge-std-plus", 0.72, "GE HiSpeed STD+ head, 0.49 mm pixels", 0.314),
    # GE Discovery ST/STE at 0.94-0.98 mm pixels: sharper than a Hann window can be at that pixel size (its full
    # bandwidth gives a mean frequency of 0.21-0.22 cycles/mm); a cosine window (0.265) and a Shepp-Logan window
    # (0.350) at full bandwidth stand for them.
    Kernel("ge-discovery-soft", 2.0, "GE Discovery ST SOFT / STANDARD limbs, 0.98 mm pixels", 0.282, "cosine"),
    Kernel("sharp", 2.0, "GE Discovery STE STANDARD pelvis, 0.94 mm pixels", 0.335, "shepp-logan"),
)


def kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r} (known: {', '.join(KERNELS)})") from None


def limit_noise_sd(noise: torch.Tensor, hu: torch.Tensor, own_sd: float, max_sd: float) -> tuple[torch.Tensor, float]:
    """Scale an added-noise image so that the input's total noise SD (the scan's own ``own_sd`` and the added,
    in quadrature, over the body: HU above -500) is at most ``max_sd``; returns ``(noise, total SD)``.

    For quantum noise, scaling the added noise by ``f`` is the same as raising the dose so that ``1/d - 1`` shrinks
    by ``f^2``: the texture and the streaks stay, only the level is capped (a 5 % dose of an already low-dose, thin,
    sharp-kernel scan would otherwise reach several hundred HU).
    """
    body = hu > -500.0
    if not bool(body.any()):
        return noise, float("nan")
    added = float(noise[body].std())
    total = math.hypot(own_sd, added) if math.isfinite(own_sd) else added
    if total <= max_sd or added <= 0:
        return noise, total
    target = math.sqrt(max(max_sd * max_sd - (own_sd * own_sd if math.isfinite(own_sd) else 0.0), 0.0))
    return noise * (target / added), max(max_sd, own_sd if math.isfinite(own_sd) else 0.0)


# --------------------------------------------------------------------------------------------------------------
# Flat regions and noise SD
# --------------------------------------------------------------------------------------------------------------


def _box(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(x[None, None], size, stride=1, padding=size // 2, count_include_pad=False)[0, 0]


def flat_mask(
    hu: np.ndarray | torch.Tensor, window: int = 15, hu_range: tuple[float, float] = (-300.0, 300.0),
    smooth_sigma: float = 2.0, max_gradient: float | None = None,
) -> torch.Tensor:
    """Pixels whose whole ``window`` neighbourhood is flat tissue (no edges) within ``hu_range``.

    The slice is smoothed (Gaussian ``smooth_sigma`` px) so that noise does not count as structure; a pixel is
    flat when the smoothed gradient magnitude stays under ``max_gradient`` HU/px (default: 3x its median over
    candidate tissue) everywhere within the window. Used for noise SD and HU bias, always computed on the
    reference (or a smoothed input) and applied to every image being compared.
    """
    x = torch.as_tensor(np.asarray(hu), dtype=torch.float32)
    r = int(3 * smooth_sigma)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / smooth_sigma) ** 2)
    k = k / k.sum()
    sm = F.conv2d(F.pad(x[None, None], (r, r, r, r), mode="replicate"), k.view(1, 1, 1, -1))
    sm = F.conv2d(sm, k.view(1, 1, -1, 1))[0, 0]
    gy, gx = torch.gradient(sm)
    grad = torch.sqrt(gx * gx + gy * gy)
    inside = (sm > hu_range[0]) & (sm < hu_range[1])
    if not inside.any():
        return torch.zeros_like(inside)
    if max_gradient is None:
        max_gradient = float(3.0 * grad[inside].median().clamp(min=0.5))
    ok = (inside & (grad < max_gradient)).float()
    # Erode: every pixel in the window must be ok.
    return _box(ok, window) > 0.999


def local_sd(x: np.ndarray | torch.Tensor, window: int = 15) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    m = _box(t, window)
    v = (_box(t * t, window) - m * m).clamp(min=0)
    return torch.sqrt(v * window * window / (window * window - 1)).float()


def noise_sd(x: np.ndarray | torch.Tensor, mask: torch.Tensor, window: int = 15) -> float:
    """Median of the local SD over ``mask`` (flat regions): the noise SD in HU. NaN when the mask is empty."""
    if not bool(mask.any()):
        return float("nan")
    return float(local_sd(x, window)[mask].median())


# --------------------------------------------------------------------------------------------------------------
# Flux calibration
# --------------------------------------------------------------------------------------------------------------


def calibrate_flux(
    simulator: CTNoiseSimulator, slices: list[np.ndarray], pixel_mm: float, target_sd: float,
    masks: list[torch.Tensor] | None = None, reference_flux: float = 1e5, iterations: int = 2, seed: int = 0,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Find ``I0`` such that the simulated full-dose noise SD in flat regions equals ``target_sd``.

    Quantum noise SD scales as ``1/sqrt(I0)``; the fit starts from ``reference_flux`` and refines (the
    electronic term breaks the exact scaling). Returns ``(flux, simulated_sd_at_flux)``.
    """
    gen = torch.Generator().manual_seed(seed)
    if masks is None:
        masks = [flat_mask(s) for s in slices]
    # Projections and FBPs on ``device`` (a GPU calibrates a series in milliseconds); the counts are drawn from the
    # CPU generator and the SD is measured on the CPU, so the result does not depend on the device.
    ps = [simulator.line_integrals(torch.as_tensor(s, dtype=torch.float32, device=device), pixel_mm) for s in slices]
    flux = reference_flux
    sd = float("nan")
    for _ in range(iterations + 1):
        sds = []
        for s, p, m in zip(slices, ps, masks):
            if not bool(m.any()):
                continue
            n = simulator.full_dose_noise(torch.as_tensor(s, dtype=torch.float32, device=p.device), pixel_mm, flux,
                                          gen, p=p)
            sds.append(noise_sd(n.cpu(), m))
        if not sds:
            raise ValueError("no flat region found to calibrate the flux on")
        sd = float(np.median(sds))
        flux = flux * (sd / target_sd) ** 2
    return flux, _measure(simulator, slices, ps, masks, pixel_mm, flux, gen)


def _measure(simulator, slices, ps, masks, pixel_mm, flux, gen) -> float:
    sds = []
    for s, p, m in zip(slices, ps, masks):
        if bool(m.any()):
            n = simulator.full_dose_noise(torch.as_tensor(s, dtype=torch.float32, device=p.device), pixel_mm, flux,
                                          gen, p=p)
            sds.append(noise_sd(n.cpu(), m))
    return float(np.median(sds))


# --------------------------------------------------------------------------------------------------------------
# MR and X-ray
# --------------------------------------------------------------------------------------------------------------


def rician(magnitude: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rician noise: ``|m + n1 + i n2|`` with independent ``N(0, sigma^2)`` parts."""
    n1 = torch.randn(magnitude.shape, generator=generator) * sigma
    n2 = torch.randn(magnitude.shape, generator=generator) * sigma
    return torch.sqrt((magnitude + n1) ** 2 + n2**2)


def poisson_gaussian(
    image: torch.Tensor, gain: float, electronic_sd: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Poisson-Gaussian: ``gain * Poisson(image / gain) + N(0, electronic_sd^2)`` (image >= 0, in signal units)."""
    quanta = torch.poisson((image / gain).clamp(min=0), generator=generator)
    return gain * quanta + electronic_sd * torch.randn(image.shape, generator=generator)


def noise_power_spectrum(noise: torch.Tensor | np.ndarray, pixel_mm: float = 1.0, bins: int = 32):
    """Radially averaged NPS of a noise image (mean removed): ``(frequency cycles/mm, nps)``.

    ``noise`` may be ``(H, W)`` or a stack ``(N, H, W)`` of realisations or ROIs (averaged).
    """
    x = torch.as_tensor(np.asarray(noise), dtype=torch.float64)
    if x.dim() == 2:
        x = x[None]
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    h, w = x.shape[-2:]
    spec = (torch.fft.fft2(x).abs() ** 2).mean(0) * (pixel_mm * pixel_mm) / (h * w)
    fy = torch.fft.fftfreq(h, d=pixel_mm)
    fx = torch.fft.fftfreq(w, d=pixel_mm)
    fr = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    fmax = 0.5 / pixel_mm
    edges = torch.linspace(0, fmax, bins + 1, dtype=torch.float64)
    idx = torch.bucketize(fr.flatten(), edges) - 1
    keep = (idx >= 0) & (idx < bins)
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx[keep], spec.flatten()[keep])
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx[keep], torch.ones_like(spec.flatten()[keep]))
    centres = 0.5 * (edges[1:] + edges[:-1])
    return centres.numpy(), (total / count.clamp(min=1)).numpy()
