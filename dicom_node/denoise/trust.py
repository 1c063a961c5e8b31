"""The trust check: is what the network removed from a series only noise?

For a few frames of a job (input and output in the same physical units: HU for CT, stored values otherwise) the
residual ``input - output`` is tested six ways (five scored, ``blob_z`` recorded):

``edge_ratio``
    RMS of the residual on the output's strongest edges over its RMS in the flattest pixels of the body. An honest
    denoiser removes noise everywhere (about 1, often below: noise at edges is left alone); a model that blurs
    removes the edges themselves (far above 1). The Pearson correlation between the residual's local energy and
    the output's gradient magnitude is reported beside it (``edge_correlation``), not scored.
``bias``
    The median of the residual's means over large blocks of the body: a model that changed intensities has a
    bias (in HU for CT; in units of the residual's noise SD otherwise). ``max_block_shift`` (the largest block
    mean off that median) is reported, not scored.
``blob_z``
    Something lesion-sized in the residual that is absent from the input's noise: the residual is band-passed
    (difference of Gaussians) at lesion scales (:data:`LESION_DIAMETERS_MM`, converted with PixelSpacing) and
    divided by its local noise level (its finest scale, where a painted-in disc has almost no energy, averaged
    over a few lesions' width, so noise that varies across the body does not count). Of each blob only the part
    the input does not hold at the same place counts (an honest model removes part of a fluctuation of the input:
    same sign, at most its size; a structure painted into the output is a residual blob where the input has none).
    The largest such value over the band's robust SD is the score (Gaussian noise: about 4-5 over 16 slices).
    Blobs within a lesion's width of the strongest edges (a CNN's residual has structure at bone and air edges:
    the edge check's business) and blobs of less than :data:`BLOB_MIN_AMPLITUDE` of the input's pixel noise are
    not counted.

``nps_excess``
    The residual's noise power spectrum against the input's, in the same flat ROIs (32 px, clear of strong edges,
    on up to :data:`SPECTRAL_MAX_FRAMES` frames): the power the residual has beyond the input's, over the input's.
    An honest model removes at each frequency at most what the input holds there.
``nps_peak``
    The same spectra per Fourier coefficient (summed over every ROI): the largest excess of the residual's power
    over the input's, over the input's. A periodic pattern the model added (a checkerboard, stripes) is a narrow
    peak that the radial bins of ``nps_excess`` dilute.
``sfrc``
    Patch-wise Fourier ring correlation in the lesion band (sFRC-style, see :func:`_sfrc_patches`): the largest
    power the output added in a patch, anti-correlated with what was removed, over the input's power there.

``blob_z`` is recorded, no longer scored: on the real CT of the evaluation set honest models reached 22 (heads,
chest), above painted 30 HU discs (5.5); the sFRC took its place.

Each check maps its number onto [0, 1] (1 up to its ``ok`` level, 0.5 at ``warn``, 0 at ``fail``, linear
between); the series' score is the smallest, and its verdict ``fail`` when any check reached its fail level,
``warn`` when any reached its warn level, else ``pass``. numpy and scipy only: it runs on the arrays the worker
already has, on up to :data:`MAX_FRAMES` frames (2.2 s for 16 frames of 512x512 on one shared CPU core).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

#: Frames of a series checked (evenly spaced): enough to see a bad model, cheap on the CPU.
MAX_FRAMES = 16
#: Pixels below this (HU) are air or padding: outside the body. Other units use :func:`_body_mask`'s threshold.
BODY_THRESHOLD_HU = -500.0
#: Pixels within this many pixels of the body still count (the skin line is an edge a blurring model removes).
BODY_DILATION_PX = 4
#: Gaussian sigma (pixels) of the output before its gradient is taken: the anatomy's edges, not its noise.
EDGE_SMOOTHING_PX = 1.5
#: The strongest edges: this top fraction of the body's gradient magnitudes; the flattest: the bottom half.
EDGE_FRACTION = 0.02
FLAT_FRACTION = 0.5
#: Block size (mm) for the mean shift; blocks less than this fraction in the body are ignored.
BLOCK_MM = 24.0
BLOCK_BODY_FRACTION = 0.9
#: Lesion diameters (mm) looked for in the residual (band-pass scales).
LESION_DIAMETERS_MM = (3.0, 5.0, 7.0, 10.0)
#: Lesions at least this wide (pixels) after 2x2 binning are looked for in the binned residual.
MIN_BINNED_DIAMETER_PX = 4.0
#: Pixel spacing assumed when a series has none (mm).
DEFAULT_PIXEL_SPACING_MM = 0.7
#: Half-width (in lesion diameters) of the box averaging the local noise level the band-passed residual is divided by.
NOISE_MAP_SIGMA_DIAMETERS = 3.0

#: (ok, warn, fail) levels per scored check, set on the synthetic phantom (tests/unit/test_trust.py). On real series
#: (bundled ct-cnn-small) they were not changed; the blob search was (edge exclusion, the input-explained part and
#: the amplitude floor were added after it flagged every real series; README, "The trust check").
EDGE_RATIO_LEVELS = (1.5, 2.0, 3.0)
BIAS_HU_LEVELS = (2.0, 4.0, 8.0)
BIAS_SIGMA_LEVELS = (0.1, 0.2, 0.4)  # for series not in HU: bias over the residual's noise SD
BLOB_Z_LEVELS = (6.0, 7.5, 9.0)
#: Blobs are not looked for within a lesion's width of this top fraction of the body's edges (a CNN's residual
#: has structure at bone and air edges; the edge check judges those).
BLOB_EDGE_FRACTION = 0.10
#: A blob counts only when its band-passed amplitude is at least this fraction of the input's pixel noise SD.
BLOB_MIN_AMPLITUDE = 0.15
#: NPS match: square ROIs (pixels) in the flattest parts of the body, on a grid of half their size; radial bins of
#: the spectrum (0 to 0.5 cycles/pixel). ROIs with a pixel among the strongest edges (BLOB_EDGE_FRACTION) are left out.
NPS_ROI_PX = 32
NPS_BINS = 8
#: Frames the NPS match and the sFRC look at (evenly spaced among those checked): they cost more per frame.
SPECTRAL_MAX_FRAMES = 8
#: sFRC: square patches of about this size (mm; 32-64 pixels), on a grid of a quarter of their size, at least this
#: fraction in the body; the lesion band is the rings up to 1 / (2 x SFRC_FEATURE_MM) (a 3 mm lesion's scale).
SFRC_PATCH_MM = 32.0
SFRC_FEATURE_MM = 3.0
SFRC_BODY_FRACTION = 0.5
#: (ok, warn, fail) of the NPS excess (the residual's power above the input's, over the input's: a fraction) and of
#: the sFRC's added power (the output's lesion-band power anti-correlated with what was removed, over the input's
#: power in that patch and band). Set on the real CT of the evaluation set (README, "The trust check").
NPS_EXCESS_LEVELS = (0.10, 0.20, 0.35)
#: (ok, warn, fail) of the largest per-coefficient excess of the residual's power over the input's (a periodic
#: pattern the model added; honest models stay at the statistical scatter of the sums).
NPS_PEAK_LEVELS = (0.5, 1.0, 2.0)
SFRC_LEVELS = (0.45, 0.6, 0.8)
#: A residual this small (relative to the input's spread) is "nothing removed": trusted without testing.
NOTHING_REMOVED = 1e-4

VERDICTS = ("pass", "warn", "fail")
#: Values the robust statistics are taken from (a regular subsample of larger sets: the median is then cheap).
ROBUST_SAMPLE = 200_000


@dataclass
class TrustResult:
    """The outcome of the trust check of one series.

    Attributes
    ----------
    score
        In [0, 1]; 1 means the residual looks like pure noise.
    verdict
        ``pass``, ``warn`` or ``fail``.
    checks
        The numbers behind it (``edge_ratio``, ``bias``, ``nps_excess``, ``nps_peak``, ``sfrc`` scored; the others for
        the record).
    reasons
        One line per check that reached its warn or fail level.
    frames
        Frames checked.
    """

    score: float
    verdict: str
    checks: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    frames: int = 0

    def summary(self) -> str:
        """``pass 0.93`` (for logs, the dashboard and ``jobs show``)."""
        return f"{self.verdict} {self.score:.2f}"

    def describe(self) -> str:
        """``fail 0.00: edge_ratio 4.1 (fail at 3.0)`` or ``pass 0.93``."""
        return self.summary() + (": " + "; ".join(self.reasons) if self.reasons else "")

    def to_json(self) -> str:
        """The detail stored with the job."""
        return json.dumps(asdict(self), sort_keys=True)


def _ramp(value: float, levels: tuple[float, float, float]) -> float:
    """1 up to ``ok``, 0.5 at ``warn``, 0 from ``fail`` on, linear between."""
    ok, warn, fail = levels
    if not math.isfinite(value) or value >= fail:
        return 0.0
    if value <= ok:
        return 1.0
    if value <= warn:
        return 1.0 - 0.5 * (value - ok) / (warn - ok)
    return 0.5 - 0.5 * (value - warn) / (fail - warn)


def _robust_sd(values: np.ndarray) -> float:
    """1.4826 x the median absolute deviation (from a regular subsample of at most ``ROBUST_SAMPLE`` values)."""
    if values.size == 0:
        return 0.0
    if values.size > ROBUST_SAMPLE:
        values = values[:: values.size // ROBUST_SAMPLE]
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma, truncate=3.0)


def _body_mask(image: np.ndarray, hu: bool, valid: np.ndarray) -> np.ndarray:
    smooth = _smooth(image, 2.0)
    if hu:
        body = smooth > BODY_THRESHOLD_HU
    else:
        lo, hi = np.percentile(image[valid], (1, 99)) if valid.any() else (0.0, 0.0)
        body = smooth > lo + 0.1 * (hi - lo)
    body = ndimage.binary_dilation(body, iterations=BODY_DILATION_PX)
    return body & valid


def _block_means(residual: np.ndarray, body: np.ndarray, block: int) -> list[float]:
    means = []
    rows, cols = residual.shape
    for r0 in range(0, rows - block + 1, block):
        for c0 in range(0, cols - block + 1, block):
            m = body[r0:r0 + block, c0:c0 + block]
            if m.mean() >= BLOCK_BODY_FRACTION:
                means.append(float(residual[r0:r0 + block, c0:c0 + block][m].mean()))
    return means


def _bin2(image: np.ndarray) -> np.ndarray:
    rows, cols = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    return image[:rows, :cols].reshape(rows // 2, 2, cols // 2, 2).mean(axis=(1, 3))


BlobPlanes = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _blob_planes(image: np.ndarray, residual: np.ndarray, body: np.ndarray, strong: np.ndarray) -> BlobPlanes:
    """The residual, the body, the residual's finest scale (its local noise level: a lesion-sized disc has almost
    no energy there) and the input's finest scale (the input's pixel noise, for the blob's amplitude)."""
    return image, residual, body, strong, residual - _smooth(residual, 1.0), image - _smooth(image, 1.0)


def _blob_values(image: np.ndarray, residual: np.ndarray, body: np.ndarray, strong: np.ndarray,
                 fine: np.ndarray, fine_input: np.ndarray, diameter: float) -> tuple[np.ndarray, ...]:
    """Inside the body, away from strong edges: the residual band-passed at ``diameter`` (pixels) over its local
    noise level, the part of it the input does not explain (same scale), the band-pass in physical units, and the
    input's finest scale."""
    s = diameter / (2.0 * math.sqrt(2.0))
    band = _smooth(residual, s) - _smooth(residual, 1.6 * s)
    # Boxes: their cost does not grow with their size. The noise level is averaged over a few lesions' width;
    # values within a lesion of the body's edge or of a strong edge are left out.
    size = max(3, int(round(2 * NOISE_MAP_SIGMA_DIAMETERS * diameter)))
    level = np.sqrt(np.maximum(ndimage.uniform_filter(fine * fine, size), 0.0) + 1e-12)
    width = 2 * int(diameter) + 1
    inside = ndimage.uniform_filter(body.astype(np.float32), width) > 0.999
    inside &= ndimage.uniform_filter(strong.astype(np.float32), width) < 1e-3
    # The part of the residual's blob that the input does not hold at the same place: an honest model removes
    # (part of) a fluctuation of the input, so its residual blob has the input's sign and at most its size; a
    # structure painted into the output is a blob of the residual where the input has none.
    band_input = _smooth(image, s) - _smooth(image, 1.6 * s)
    explained = np.clip(np.sign(band) * band_input, 0.0, None)
    unexplained = np.sign(band) * np.maximum(np.abs(band) - explained, 0.0)
    return (band / level)[inside], (unexplained / level)[inside], band[inside], fine_input[inside]


def _radial_bins(size: int, bins: int) -> np.ndarray:
    """Per rfft2 coefficient of a ``size`` x ``size`` image, its radial bin (0..bins-1 from 0 to 0.5 cycles/pixel,
    the corners beyond 0.5 in the last; -1 for DC)."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fy, fx)
    index = np.minimum((radius / 0.5 * bins).astype(int), bins - 1)
    index[radius == 0] = -1
    return index


def _rfft_weights(size: int) -> np.ndarray:
    """Weights that make sums over rfft2 coefficients equal sums over the full spectrum (the columns that stand for
    two conjugate coefficients count twice)."""
    w = np.full(size // 2 + 1, 2.0)
    w[0] = 1.0
    if size % 2 == 0:
        w[-1] = 1.0
    return w[None, :]


NpsSums = tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]


def _nps_sums(x: np.ndarray, r: np.ndarray, body: np.ndarray, strong: np.ndarray) -> NpsSums | None:
    """Power of the input and of the residual per radial bin, summed over the flat ROIs of one frame, the
    coefficients per bin, the ROIs' count, and the two powers per rfft2 coefficient (same sums); ``None`` when
    the frame has none.

    The ROIs lie wholly in the body and clear of the strongest edges (``strong``); each ROI's mean is removed."""
    size = NPS_ROI_PX
    if min(x.shape) < size:
        return None
    starts = [(r0, c0) for r0 in range(0, x.shape[0] - size + 1, size // 2)
              for c0 in range(0, x.shape[1] - size + 1, size // 2)]
    starts = [(r0, c0) for r0, c0 in starts if body[r0:r0 + size, c0:c0 + size].all()
              and not strong[r0:r0 + size, c0:c0 + size].any()]
    if not starts:
        return None
    xs = np.stack([x[r0:r0 + size, c0:c0 + size] for r0, c0 in starts]).astype(np.float64)
    rs = np.stack([r[r0:r0 + size, c0:c0 + size] for r0, c0 in starts]).astype(np.float64)
    xs -= xs.mean(axis=(1, 2), keepdims=True)
    rs -= rs.mean(axis=(1, 2), keepdims=True)
    weights = _rfft_weights(size)
    px = (np.abs(np.fft.rfft2(xs)) ** 2 * weights).sum(axis=0)
    pr = (np.abs(np.fft.rfft2(rs)) ** 2 * weights).sum(axis=0)
    index = _radial_bins(size, NPS_BINS)
    wide = np.broadcast_to(weights, index.shape)
    keep = index >= 0
    count = np.bincount(index[keep], wide[keep], NPS_BINS + 1)[:NPS_BINS]
    return (np.bincount(index[keep], px[keep], NPS_BINS + 1)[:NPS_BINS],
            np.bincount(index[keep], pr[keep], NPS_BINS + 1)[:NPS_BINS], count, len(starts),
            np.where(keep, px, 0.0), np.where(keep, pr, 0.0))


def _sfrc_patches(x: np.ndarray, y: np.ndarray, body: np.ndarray, spacing: float) -> tuple[np.ndarray, list]:
    """Per patch of one frame: the output's lesion-band power anti-correlated with the residual, over the input's
    power in that band (``-Re sum(Y R*) / sum |X|^2``, X, Y, R the Hann-windowed patches' spectra of input, output and
    residual); and the patches' (row, column) centres.

    An honest model's output and residual split the input (Y = aX, R = (1 - a)X at each frequency for a linear
    filter; a nonlinear denoiser is near it): their cross power is positive or about zero. A structure D painted into
    the output is in Y and, negated, in R: the cross power is -|D|^2, so the value is about |D|^2 / |X|^2, the power
    the output added over the power the input has there (the sFRC of FDA's hallucination work compares output and
    input patch by patch in the same spirit).
    """
    size = int(np.clip(round(SFRC_PATCH_MM / spacing / 2.0) * 2, 32, 64))
    if min(x.shape) < size:
        return np.zeros(0), []
    step = size // 4
    inside = ndimage.uniform_filter(body.astype(np.float32), size, mode="constant")
    centres = [(r0 + size // 2, c0 + size // 2) for r0 in range(0, x.shape[0] - size + 1, step)
               for c0 in range(0, x.shape[1] - size + 1, step)]
    centres = [(r, c) for r, c in centres if inside[r, c] >= SFRC_BODY_FRACTION]
    if not centres:
        return np.zeros(0), []
    index = _radial_bins(size, size // 2)  # one bin per ring (cycles per patch)
    rings = max(2, int(size * spacing / (2.0 * SFRC_FEATURE_MM)))
    band = (index >= 1) & (index <= rings)  # ring 0 (the lowest) is the patch's shading: left out
    weights = np.broadcast_to(_rfft_weights(size), band.shape)[band]
    window = np.outer(np.hanning(size), np.hanning(size))
    values = []
    for start in range(0, len(centres), 256):  # bounded memory
        part = centres[start:start + 256]
        xs = np.stack([x[r - size // 2:r + size // 2, c - size // 2:c + size // 2] for r, c in part]).astype(np.float64)
        ys = np.stack([y[r - size // 2:r + size // 2, c - size // 2:c + size // 2] for r, c in part]).astype(np.float64)
        xs -= xs.mean(axis=(1, 2), keepdims=True)
        ys -= ys.mean(axis=(1, 2), keepdims=True)
        fx = np.fft.rfft2(xs * window)[:, band]
        fy = np.fft.rfft2(ys * window)[:, band]
        cross = (np.real(fy * np.conj(fx - fy)) * weights).sum(axis=1)
        power = (np.abs(fx) ** 2 * weights).sum(axis=1)
        values.append(-cross / np.maximum(power, 1e-12))
    return np.concatenate(values), centres


def check_frames(inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray], *, hu: bool,
                 pixel_spacing_mm: float | None = None, valid: Sequence[np.ndarray | None] | None = None
                 ) -> TrustResult:
    """Test whether ``inputs - outputs`` is noise.

    Parameters
    ----------
    inputs, outputs
        Frames before and after the network, in physical units (HU for CT), of equal shapes; at most
        :data:`MAX_FRAMES` are used (evenly spaced).
    hu
        Whether the values are HU (absolute thresholds for the body and the bias).
    pixel_spacing_mm
        Row spacing of the pixels (lesion sizes in pixels); :data:`DEFAULT_PIXEL_SPACING_MM` when ``None``.
    valid
        Per frame, a mask of pixels that hold image (``False`` for padding outside the scan field), or ``None``.

    Returns
    -------
    TrustResult
    """
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError("need the same number (at least one) of input and output frames")
    picks = np.unique(np.linspace(0, len(inputs) - 1, min(MAX_FRAMES, len(inputs))).round().astype(int))
    spacing = pixel_spacing_mm if pixel_spacing_mm and pixel_spacing_mm > 0 else DEFAULT_PIXEL_SPACING_MM
    block = max(8, int(round(BLOCK_MM / spacing)))
    diameters_px = [d / spacing for d in LESION_DIAMETERS_MM]

    edge_sq: list[np.ndarray] = []
    flat_sq: list[np.ndarray] = []
    energies: list[np.ndarray] = []
    gradients: list[np.ndarray] = []
    block_means: list[float] = []
    residual_body: list[np.ndarray] = []
    blob_z = 0.0
    spread = 0.0
    bands: list[list[tuple[np.ndarray, ...]]] = [[] for _ in diameters_px]
    spectral = set(np.linspace(0, len(picks) - 1, min(SPECTRAL_MAX_FRAMES, len(picks))).round().astype(int).tolist())
    nps_parts: list[NpsSums] = []
    sfrc_worst = (-math.inf, -1, 0, 0)  # value, frame, row, column
    sfrc_patches = 0
    for position, i in enumerate(picks):
        x = np.asarray(inputs[i], dtype=np.float32)
        y = np.asarray(outputs[i], dtype=np.float32)
        if x.shape != y.shape or x.ndim != 2:
            raise ValueError("input and output frames must be 2-D and of equal shape")
        ok = np.ones(x.shape, bool) if valid is None or valid[i] is None else np.asarray(valid[i], bool)
        if hu:  # padding and below-air values carry no anatomy: flatten them to air so they make no edges
            x, y = np.maximum(x, -1024.0), np.maximum(y, -1024.0)
        fill = float(x[ok].min()) if ok.any() else 0.0
        x, y = np.where(ok, x, fill), np.where(ok, y, fill)
        body = _body_mask(x, hu, ok)
        if body.sum() < 64:
            continue
        # Only the body's bounding box is looked at (a margin keeps the filters' borders off it).
        rows_in, cols_in = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
        box = (slice(max(0, rows_in[0] - 8), rows_in[-1] + 9), slice(max(0, cols_in[0] - 8), cols_in[-1] + 9))
        x, y, body = x[box], y[box], body[box]
        spread = max(spread, float(np.percentile(x[body], 99) - np.percentile(x[body], 1)))
        r = x - y
        residual_body.append(r[body])
        g = ndimage.gaussian_gradient_magnitude(y, EDGE_SMOOTHING_PX, truncate=3.0)
        gb = g[body]
        edges = body & (g >= np.quantile(gb, 1.0 - EDGE_FRACTION))
        flats = body & (g <= np.quantile(gb, FLAT_FRACTION))
        strong = body & (g >= np.quantile(gb, 1.0 - BLOB_EDGE_FRACTION))
        edge_sq.append(r[edges] ** 2)
        flat_sq.append(r[flats] ** 2)
        energies.append(_smooth(r * r, 2.0)[body])
        gradients.append(gb)
        block_means.extend(_block_means(r, body, block))
        if position in spectral:
            part = _nps_sums(x, r, body, strong)
            if part is not None:
                nps_parts.append(part)
            added, centres = _sfrc_patches(x, y, body, spacing)
            sfrc_patches += added.size
            if added.size and float(added.max()) > sfrc_worst[0]:
                k = int(np.argmax(added))
                sfrc_worst = (float(added[k]), int(i), centres[k][0] + box[0].start, centres[k][1] + box[1].start)
        # Larger lesions are looked for in the residual binned 2x2 (a quarter of the work, the same answer).
        coarse = None
        for k, d in enumerate(diameters_px):
            if d >= 2 * MIN_BINNED_DIAMETER_PX and min(r.shape) >= 64:
                if coarse is None:
                    coarse = _blob_planes(_bin2(x), _bin2(r), _bin2(body.astype(np.float32)) > 0.99,
                                          _bin2(strong.astype(np.float32)) > 0)
                bands[k].append(_blob_values(*coarse, d / 2.0))
            else:
                bands[k].append(_blob_values(*_blob_planes(x, r, body, strong), d))
    if not residual_body:
        return TrustResult(1.0, "pass", {"frames_without_body": float(len(picks))}, [], int(len(picks)))

    all_res = np.concatenate(residual_body)
    noise_sd = _robust_sd(all_res)
    all_res = all_res.astype(np.float64)
    checks: dict[str, float] = {"residual_sd": noise_sd}
    if float(np.sqrt(np.mean(all_res ** 2))) <= NOTHING_REMOVED * max(spread, 1.0):
        checks.update(edge_ratio=1.0, bias=0.0, blob_z=0.0, nps_excess=0.0, nps_peak=0.0, sfrc=0.0)
        return TrustResult(1.0, "pass", checks, ["nothing removed"], int(len(picks)))

    floor = NOTHING_REMOVED * max(spread, 1.0)
    edge_rms = math.sqrt(float(np.mean(np.concatenate(edge_sq)))) if edge_sq else 0.0
    flat_rms = math.sqrt(float(np.mean(np.concatenate(flat_sq)))) if flat_sq else 0.0
    checks["edge_ratio"] = edge_rms / max(flat_rms, floor)
    e, g = np.concatenate(energies), np.concatenate(gradients)
    step = max(1, e.size // ROBUST_SAMPLE)
    e, g = e[::step], g[::step]
    checks["edge_correlation"] = float(np.corrcoef(e, g)[0, 1]) if e.std() > 0 and g.std() > 0 else 0.0

    bias = float(np.median(block_means)) if block_means else float(np.median(all_res))
    checks["bias"] = bias
    checks["max_block_shift"] = float(np.max(np.abs(np.asarray(block_means) - bias))) if block_means else 0.0
    bias_scored = abs(bias) if hu else abs(bias) / max(noise_sd, floor)

    blob_amplitude = 0.0
    for k, d in enumerate(LESION_DIAMETERS_MM):
        if not bands[k]:
            continue
        values = np.concatenate([v for v, _u, _a, _n in bands[k]])
        if values.size < 64:
            continue
        unexplained = np.concatenate([u for _v, u, _a, _n in bands[k]])
        z = float(np.max(np.abs(unexplained))) / max(_robust_sd(values), 1e-12)
        # The blob's amplitude over the input's pixel noise (at its own resolution): a residual of a few quantised
        # HU has heavy tails and can make a high z from blobs of a fraction of a HU that no reader would see.
        amplitude = float(np.max(np.abs(np.concatenate([a for _v, _u, a, _n in bands[k]]))))
        amplitude /= max(_robust_sd(np.concatenate([n for _v, _u, _a, n in bands[k]])), 1e-12)
        checks[f"blob_z_{d:g}mm"] = z
        checks[f"blob_amplitude_{d:g}mm"] = amplitude
        if amplitude >= BLOB_MIN_AMPLITUDE:
            blob_z = max(blob_z, z)
        blob_amplitude = max(blob_amplitude, amplitude)
    checks["blob_amplitude"] = blob_amplitude
    checks["blob_z"] = blob_z

    where: dict[str, str] = {}
    if nps_parts:
        # The residual's noise power spectrum against the input's, in the same flat ROIs: an honest model removes at
        # each frequency at most what the input holds there; power beyond it is something the model added
        # (texture, a pattern). Its normalised shape's distance to the input's is recorded, not scored: a CNN
        # removes mostly the fine noise, so the shapes differ for honest models too.
        p_in = np.sum([part[0] for part in nps_parts], axis=0)
        p_res = np.sum([part[1] for part in nps_parts], axis=0)
        excess = np.maximum(p_res - p_in, 0.0)
        # Per frequency bin, over the input's power in that bin: the low frequencies hold most of the input's
        # power, so a total would hide a pattern added at high frequencies (a +/-10 HU checkerboard: 0.004).
        per_bin = excess / np.maximum(p_in, 1e-12 * max(float(p_in.max()), 1e-12))
        checks["nps_excess"] = float(per_bin.max())
        checks["nps_excess_total"] = float(excess.sum() / max(float(p_in.sum()), 1e-12))
        # A periodic pattern (a checkerboard, stripes) is a narrow peak: per coefficient, summed over every ROI.
        c_in = np.sum([part[4] for part in nps_parts], axis=0)
        c_res = np.sum([part[5] for part in nps_parts], axis=0)
        ratio = (c_res - c_in) / np.where(c_in > 0, c_in, np.inf)
        checks["nps_peak"] = max(0.0, float(ratio.max()))
        checks["nps_shape_distance"] = float(np.abs(p_res / max(float(p_res.sum()), 1e-12)
                                                    - p_in / max(float(p_in.sum()), 1e-12)).sum())
        frequencies = (np.arange(NPS_BINS) + 0.5) / NPS_BINS * 0.5 / spacing  # cycles/mm
        checks["nps_input_mean_freq"] = float((frequencies * p_in).sum() / max(float(p_in.sum()), 1e-12))
        checks["nps_residual_mean_freq"] = float((frequencies * p_res).sum() / max(float(p_res.sum()), 1e-12))
        checks["nps_rois"] = float(sum(int(part[3]) for part in nps_parts))
        if excess.any():
            k = int(np.argmax(per_bin))
            where["nps_excess"] = f"most at {frequencies[k]:.2f} cycles/mm"
    else:
        checks["nps_excess"] = checks["nps_peak"] = 0.0
    checks["sfrc"] = max(0.0, sfrc_worst[0]) if sfrc_patches else 0.0
    checks["sfrc_patches"] = float(sfrc_patches)
    if sfrc_patches:
        where["sfrc"] = f"frame {sfrc_worst[1]}, row {sfrc_worst[2]}, column {sfrc_worst[3]}"

    scored = (("edge_ratio", checks["edge_ratio"], EDGE_RATIO_LEVELS),
              ("bias", bias_scored, BIAS_HU_LEVELS if hu else BIAS_SIGMA_LEVELS),
              ("nps_excess", checks["nps_excess"], NPS_EXCESS_LEVELS),
              ("nps_peak", checks["nps_peak"], NPS_PEAK_LEVELS),
              ("sfrc", checks["sfrc"], SFRC_LEVELS))
    score = 1.0
    verdict = "pass"
    reasons = []
    for name, value, levels in scored:
        s = _ramp(value, levels)
        score = min(score, s)
        unit = " HU" if name == "bias" and hu else (" SD" if name == "bias" else "")
        at = f", {where[name]}" if name in where else ""
        if value >= levels[2]:
            verdict = "fail"
            reasons.append(f"{name} {value:.2f}{unit} (fail at {levels[2]:g}{at})")
        elif value >= levels[1]:
            verdict = "warn" if verdict == "pass" else verdict
            reasons.append(f"{name} {value:.2f}{unit} (warn at {levels[1]:g}{at})")
    return TrustResult(round(score, 3), verdict, {k: round(v, 4) for k, v in checks.items()}, reasons,
                       int(len(picks)))
