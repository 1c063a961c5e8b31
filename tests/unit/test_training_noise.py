"""Noise simulation: FBP, CT noise statistics (mean, variance, NPS shape), flux calibration, Rician,
Poisson-Gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.noise import (
    CTNoiseSimulator,
    ParallelBeam,
    calibrate_flux,
    flat_mask,
    noise_power_spectrum,
    noise_sd,
    poisson_gaussian,
    rician,
)

torch.set_num_threads(1)

SIZE = 96
PIXEL_MM = 2.0  # a 19 cm field of view, head-sized


def water_disk(size: int = SIZE, radius: float = 0.42, hu: float = 0.0) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - (size - 1) / 2, xx - (size - 1) / 2) / size
    img = np.where(r < radius, hu, -1000.0).astype(np.float32)
    return torch.from_numpy(img)


def centre_mask(size: int = SIZE, half: int = 16) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    c = size // 2
    m[c - half:c + half, c - half:c + half] = True
    return m


@pytest.fixture(scope="module")
def simulator() -> CTNoiseSimulator:
    return CTNoiseSimulator(geometry=ParallelBeam(n_views=120, window="hann"), electronic_sd=0.0)


def test_fbp_reconstructs_a_disk():
    geometry = ParallelBeam(n_views=180, window="ramp", projection_downsample=1)
    img = water_disk(hu=0.0) * 0 + (water_disk() > -500).float()  # 1 inside, 0 outside
    sino = geometry.project(img, PIXEL_MM)
    assert float(sino.max()) == pytest.approx(2 * 0.42 * SIZE * PIXEL_MM, rel=0.03)  # the diameter
    rec = geometry.fbp(sino, (SIZE, SIZE), PIXEL_MM)
    inside = rec[centre_mask()]
    assert float(inside.mean()) == pytest.approx(1.0, abs=0.03)
    assert abs(float(rec[:6, :6].mean())) < 0.03


def _noise_stack(simulator, image, flux, dose, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = simulator.line_integrals(image, PIXEL_MM)
    return torch.stack([simulator.added_noise(image, PIXEL_MM, flux, dose, gen, p=p) for _ in range(n)])


def test_ct_noise_mean_zero_and_variance_as_predicted(simulator):
    image = water_disk()
    m = centre_mask()
    flux = 2e4
    quarter = _noise_stack(simulator, image, flux, 0.25, 12, seed=1)
    half = _noise_stack(simulator, image, flux, 0.5, 12, seed=2)
    double_flux = _noise_stack(simulator, image, 2 * flux, 0.25, 12, seed=3)
    var_q = float(quarter[:, m].var())
    var_h = float(half[:, m].var())
    var_2 = float(double_flux[:, m].var())
    # Mean preserved: the added noise averages to zero (well within its standard error).
    se = math.sqrt(var_q / (12 * int(m.sum()))) * 10  # x10: neighbouring pixels are correlated
    assert abs(float(quarter[:, m].mean())) < se
    # Added variance (1/d - 1) / I0: quarter dose adds 3x what half dose adds; twice the flux halves it.
    assert var_q / var_h == pytest.approx(3.0, rel=0.15)
    assert var_q / var_2 == pytest.approx(2.0, rel=0.15)
    # Full dose adds nothing.
    assert float(simulator.added_noise(image, PIXEL_MM, flux, 1.0).abs().max()) == 0.0


def test_ct_noise_is_correlated_like_fbp_noise_not_white(simulator):
    image = water_disk()
    noise = _noise_stack(simulator, image, 2e4, 0.25, 8, seed=4)
    rois = noise[:, SIZE // 2 - 16:SIZE // 2 + 16, SIZE // 2 - 16:SIZE // 2 + 16]
    f, ps = noise_power_spectrum(rois, PIXEL_MM, bins=8)
    white = torch.randn(8, 32, 32) * float(rois.std())
    _, pw = noise_power_spectrum(white, PIXEL_MM, bins=8)
    # Ramp-filtered noise: little power at the lowest frequencies, a peak at mid frequencies (Hann roll-off).
    peak = int(np.argmax(ps))
    assert 0 < peak < len(ps) - 1
    assert ps[0] < 0.65 * ps.max()
    assert ps[-1] < 0.1 * ps.max()
    # White noise of the same SD has a flat spectrum.
    assert pw[0] > 0.6 * pw.max() and pw[-1] > 0.6 * pw.max()


def test_ct_noise_is_larger_behind_more_attenuation(simulator):
    small, big = water_disk(radius=0.2), water_disk(radius=0.45)
    m = centre_mask(half=6)
    var_small = float(_noise_stack(simulator, small, 2e4, 0.25, 8, seed=5)[:, m].var())
    var_big = float(_noise_stack(simulator, big, 2e4, 0.25, 8, seed=6)[:, m].var())
    assert var_big > 1.5 * var_small


def test_flux_calibration_recovers_the_scans_flux(simulator):
    image = water_disk()
    true_flux = 3e4
    scan = image + simulator.full_dose_noise(image, PIXEL_MM, true_flux, torch.Generator().manual_seed(7))
    mask = flat_mask(image, window=9)
    target = noise_sd(scan, mask, window=9)
    masks = [mask]
    flux, simulated = calibrate_flux(simulator, [image.numpy()], PIXEL_MM, target, masks, iterations=2, seed=8)
    assert simulated == pytest.approx(target, rel=0.1)
    assert flux == pytest.approx(true_flux, rel=0.3)


def test_rician_statistics():
    gen = torch.Generator().manual_seed(0)
    sigma = 5.0
    high = rician(torch.full((200, 200), 200.0), sigma, gen)
    assert float(high.mean()) == pytest.approx(200.0 + sigma**2 / 400, abs=0.2)
    assert float(high.std()) == pytest.approx(sigma, rel=0.05)
    zero = rician(torch.zeros(200, 200), sigma, gen)
    assert float(zero.mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)  # Rayleigh


def test_poisson_gaussian_statistics():
    gen = torch.Generator().manual_seed(0)
    gain, sigma_e = 2.0, 3.0
    for level in (20.0, 400.0):
        out = poisson_gaussian(torch.full((200, 200), level), gain, sigma_e, gen)
        assert float(out.mean()) == pytest.approx(level, rel=0.02, abs=0.3)
        assert float(out.var()) == pytest.approx(gain * level + sigma_e**2, rel=0.06)


def test_philips_phantom_self_calibration(shared_data):
    """The simulator calibrated on the high-dose phantom scan reproduces its flat-region noise SD."""
    from training.data import NoiseSettings, calibrate_series_flux, read_one_series

    series = read_one_series(shared_data / "ct" / "philips-head-phantom-highdose-2.5mm")
    series.volume = series.volume[20:30]
    flux, measured, simulated = calibrate_series_flux(series, NoiseSettings(n_views=180), max_slices=2)
    assert 1.0 < measured < 30.0
    assert simulated == pytest.approx(measured, rel=0.15)
    assert 1e3 < flux < 1e8


def test_fbp_window_cutoff_sets_the_noise_texture():
    """A smoother kernel (lower cutoff) moves noise power to low frequencies; (c)^3 flux scaling keeps the SD."""
    image = water_disk()
    m = centre_mask()
    out = {}
    for c in (1.0, 0.4):
        sim = CTNoiseSimulator(geometry=ParallelBeam(n_views=120, window="hann", cutoff=c), electronic_sd=0.0)
        noise = _noise_stack(sim, image, 2e4 * c**3, 0.25, 6, seed=9)
        rois = noise[:, SIZE // 2 - 16:SIZE // 2 + 16, SIZE // 2 - 16:SIZE // 2 + 16]
        f, ps = noise_power_spectrum(rois, PIXEL_MM, bins=8)
        out[c] = (float((f * ps).sum() / ps.sum()), float(noise[:, m].std()))
    assert out[0.4][0] < 0.7 * out[1.0][0]
    assert out[0.4][1] == pytest.approx(out[1.0][1], rel=0.35)


# ------------------------------------------------------------------------------------------ body CT physics


def ellipse(size: int = SIZE, ax: float = 0.45, ay: float = 0.25) -> torch.Tensor:
    yy, xx = np.mgrid[:size, :size]
    x = (xx - (size - 1) / 2) / (ax * size)
    y = (yy - (size - 1) / 2) / (ay * size)
    return torch.from_numpy(np.where(x * x + y * y < 1, 0.0, -1000.0).astype(np.float32))


def test_tube_current_follows_the_attenuation_and_keeps_the_dose() -> None:
    sim = CTNoiseSimulator(ParallelBeam(n_views=60), tcm_strength=0.5)
    p = sim.line_integrals(ellipse(), PIXEL_MM)
    m = sim.view_current(p)
    assert float(m.mean()) == pytest.approx(1.0, rel=1e-5)
    lateral = int(np.argmax(torch.quantile(p, 0.98, dim=1).numpy()))  # the view through the long axis
    assert int(torch.argmax(m)) == lateral and float(m.max() / m.min()) > 1.5
    flat = CTNoiseSimulator(ParallelBeam(n_views=60)).view_current(p)
    assert torch.equal(flat, torch.ones_like(flat))


def test_bowtie_gives_the_periphery_fewer_quanta() -> None:
    sim = CTNoiseSimulator(bowtie_edge=0.1, bowtie_fov_mm=200.0)
    b = sim.bowtie(101, 2.0)
    assert float(b[50]) == pytest.approx(1.0) and float(b[0]) == pytest.approx(0.1)
    assert float(b[25]) < 1.0 and float(b[25]) > 0.1


def test_electronic_noise_dominates_at_low_flux_in_the_variance_model() -> None:
    """With a fixed electronic SD the noise grows faster than 1/sqrt(dose) when the counts get few."""
    hu = ellipse()
    gen = torch.Generator().manual_seed(0)

    def sd(sim, flux, dose):
        n = sim.added_noise(hu, PIXEL_MM, flux, dose, gen)
        return float(n[centre_mask()].std())

    quantum = CTNoiseSimulator(ParallelBeam(n_views=120), electronic_sd=0.0, electronic_model="variance")
    electronic = CTNoiseSimulator(ParallelBeam(n_views=120), electronic_sd=30.0, electronic_model="variance")
    high_flux, low_flux = 1e6, 2e3
    # At high flux the electronic term is negligible ...
    assert sd(electronic, high_flux, 0.25) == pytest.approx(sd(quantum, high_flux, 0.25), rel=0.1)
    # ... at low flux it dominates.
    assert sd(electronic, low_flux, 0.1) > 1.5 * sd(quantum, low_flux, 0.1)
    # Dose 1 adds nothing in either model.
    assert float(electronic.added_noise(hu, PIXEL_MM, low_flux, 1.0, gen).abs().max()) == 0.0


def test_added_variance_matches_the_dose_for_quantum_noise() -> None:
    """The variance model adds (1/d - 1) times the full-dose variance, like the original one."""
    hu = water_disk()
    sim = CTNoiseSimulator(ParallelBeam(n_views=120), electronic_sd=0.0, electronic_model="variance")
    gen = torch.Generator().manual_seed(1)
    full = np.mean([float(sim.full_dose_noise(hu, PIXEL_MM, 1e5, gen)[centre_mask()].var()) for _ in range(4)])
    added = np.mean([float(sim.added_noise(hu, PIXEL_MM, 1e5, 0.25, gen)[centre_mask()].var()) for _ in range(4)])
    assert added / full == pytest.approx(3.0, rel=0.15)


def test_roi_reconstruction_is_the_same_window_of_the_full_image() -> None:
    sim = CTNoiseSimulator(ParallelBeam(n_views=60))
    hu = water_disk()
    q = sim.geometry.filter(sim.projection_noise(sim.line_integrals(hu, PIXEL_MM), 1e5, 1.0,
                                                 torch.Generator().manual_seed(3), PIXEL_MM), PIXEL_MM)
    full = sim.geometry.backproject(q, (SIZE, SIZE), PIXEL_MM)
    window = sim.geometry.backproject(q, (SIZE, SIZE), PIXEL_MM, (10, 20, 30, 40))
    np.testing.assert_allclose(window.numpy(), full[10:40, 20:60].numpy(), atol=1e-4)


def test_kernels_are_ordered_smooth_to_sharp_and_follow_the_pixel_size() -> None:
    from training.noise import KERNELS, kernel

    assert kernel("smooth").cutoff_fraction(0.5) == pytest.approx(0.28)
    assert kernel("ge-standard").cutoff_fraction(1.5) == 1.0  # above Nyquist: full bandwidth
    order = list(KERNELS)
    assert order[0] == "smooth" and order[-1] == "sharp"
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel("bone")


def test_limit_noise_sd_caps_the_total_and_keeps_the_texture() -> None:
    from training.noise import limit_noise_sd

    hu = water_disk()
    noise = torch.randn(SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 400.0
    capped, total = limit_noise_sd(noise, hu, 30.0, 150.0)
    body = hu > -500
    assert math.hypot(30.0, float(capped[body].std())) == pytest.approx(150.0, rel=1e-3)
    assert total == 150.0
    assert float(torch.corrcoef(torch.stack([capped.flatten(), noise.flatten()]))[0, 1]) == pytest.approx(1.0)
    same, _ = limit_noise_sd(noise * 0.01, hu, 30.0, 150.0)
    assert torch.equal(same, noise * 0.01)
