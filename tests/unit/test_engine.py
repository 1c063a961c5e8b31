"""The inference engine: exact identity, slice order, tiling, batching, refusals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from dicom_node.denoise.engine import Engine, choose_batch_size, denoise_series, tiled_apply
from dicom_node.denoise.errors import SeriesRefused
from dicom_node.denoise.series import Instance, read_instance_header, scan
from models.folder import load_model_folder
from models.networks import build_network, receptive_radius, size_multiple
from tests.fixtures.images import make_image, make_multiframe, make_tiny_model, write_series

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root, name="id-ct")
    make_tiny_model(root, name="id-any", modalities=["CT", "MR", "CR"], input_unit="modality", mode="per-image",
                    clip=None)
    make_tiny_model(root, name="rand-ct", identity=False)
    return root


def _read_pixels(paths: list[Path]) -> dict[str, np.ndarray]:
    out = {}
    for p in paths:
        ds = pydicom.dcmread(p)
        out[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)] = ds.pixel_array
    return out


VOLUMES: dict[str, tuple[type[np.integer], int, dict[str, Any]]] = {
    "u8": (np.uint8, 8, dict(slope=1.0, intercept=0.0)),
    "u16-12bit": (np.uint16, 12, dict(slope=1.0, intercept=-1024.0)),
    "s16-16bit": (np.int16, 16, dict(slope=1.0, intercept=0.0, padding_value=-2000)),
    "s16-12bit": (np.int16, 12, dict(slope=2.5, intercept=-10.0)),
    "u16-16bit-mono1": (np.uint16, 16, dict(slope=None, photometric="MONOCHROME1")),
}


@pytest.mark.parametrize("kind", sorted(VOLUMES))
@pytest.mark.parametrize("model_name", ["id-ct", "id-any"])
def test_identity_model_returns_input_bit_for_bit(tmp_path: Path, models_dir: Path, kind: str, model_name: str) -> None:
    dtype, bits, extra = VOLUMES[kind]
    info = np.iinfo(dtype)
    lo, hi = (max(info.min, -(1 << (bits - 1))), min(info.max, (1 << (bits - 1)) - 1)) if info.min < 0 \
        else (0, min(info.max, (1 << bits) - 1))
    rng = np.random.default_rng(1)
    volume = rng.integers(lo, hi + 1, size=(3, 24, 20)).astype(dtype)
    if "padding_value" in extra:
        volume[:, :3, :] = extra["padding_value"]
    modality = "CT"
    paths = write_series(tmp_path / "in", volume, bits_stored=bits, modality=modality, **extra)
    model = load_model_folder(models_dir / model_name)
    result = denoise_series(tmp_path / "in", model, tmp_path / "out", strength=1.0)
    assert len(result.paths) == 3
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): pydicom.dcmread(p).pixel_array
               for p in paths}
    for uid, pixels in _read_pixels(result.paths).items():
        np.testing.assert_array_equal(pixels, sources[uid])
        assert pixels.dtype == sources[uid].dtype


def test_random_model_changes_pixels_but_keeps_padding(tmp_path: Path, models_dir: Path) -> None:
    volume = np.random.default_rng(2).integers(-200, 200, size=(2, 32, 32)).astype(np.int16)
    volume[:, :4] = -2000
    write_series(tmp_path / "in", volume, intercept=0.0, padding_value=-2000)
    model = load_model_folder(models_dir / "rand-ct")
    result = denoise_series(tmp_path / "in", model, tmp_path / "out")
    for path in result.paths:
        px = pydicom.dcmread(path).pixel_array
        assert (px[:4] == -2000).all()
        assert (px[4:] != -2000).any()
    out0 = pydicom.dcmread(result.paths[0]).pixel_array
    half = denoise_series(tmp_path / "in", model, tmp_path / "half", strength=0.5)
    zero = denoise_series(tmp_path / "in", model, tmp_path / "zero", strength=0.0)
    src = volume[0]
    half0 = pydicom.dcmread(half.paths[0]).pixel_array
    zero0 = pydicom.dcmread(zero.paths[0]).pixel_array
    np.testing.assert_array_equal(zero0, src)
    assert np.abs(half0.astype(int) - (src.astype(int) + out0.astype(int)) / 2).max() <= 1.0


def _position(inst: Instance) -> tuple[float, ...]:
    """The first frame's ImagePositionPatient (every image these tests write has one)."""
    position = inst.geometry[0].position
    assert position is not None
    return position


def test_slices_follow_geometry_not_instance_number(tmp_path: Path) -> None:
    volume = np.zeros((6, 8, 8), dtype=np.int16)
    write_series(tmp_path / "in", volume, shuffle_instance_numbers=True, seed=3, intercept=0.0)
    (series,) = scan([tmp_path / "in"]).series
    z = [_position(inst)[2] for inst in series.instances]
    assert z == sorted(z)
    numbers = [int(inst.header.InstanceNumber) for inst in series.instances]
    assert numbers != sorted(numbers)  # the fixture really did shuffle them


def test_slices_sort_along_an_oblique_normal(tmp_path: Path) -> None:
    c, s = np.cos(0.4), np.sin(0.4)
    orientation = (1.0, 0.0, 0.0, 0.0, c, s)  # tilted about x: normal (0, -s, c)
    normal = np.array([0.0, -s, c])
    paths = []
    uid = pydicom.uid.generate_uid()
    order = [3, 0, 4, 1, 2]
    for k in order:
        ds = make_image(np.zeros((4, 4), np.int16), position=tuple(k * 2.0 * normal + [0, 5.0 * k, 0]),
                        orientation=orientation, instance_number=10 - k, series_uid=uid)
        p = tmp_path / f"{k}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    (series,) = scan([tmp_path]).series
    where = [float(np.dot(_position(inst), normal)) for inst in series.instances]
    assert where == sorted(where)


class Blur(nn.Module):
    """A fully convolutional net with a known receptive radius (3 layers of 3x3: radius 3)."""

    size_multiple = 1
    receptive_radius = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


@pytest.mark.parametrize("shape", [(1, 1, 97, 130), (2, 1, 64, 64)])
def test_tiling_matches_whole_image_for_fully_convolutional_net(shape: tuple[int, ...]) -> None:
    net = Blur().eval()
    x = torch.randn(*shape)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_apply(net, x, tile=32, halo=3, blend=4)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_tiling_matches_whole_image_for_unet() -> None:
    net = build_network("unet-res-small", channels=[4, 8], blocks=1, unshuffle=2).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 1, 150, 90)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_apply(net, x, tile=64, halo=receptive_radius(net), blend=4, multiple=size_multiple(net))
    assert receptive_radius(net) < 64
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-4)


def test_tiling_with_small_halo_blends_seams() -> None:
    net = Blur().eval()
    x = torch.randn(1, 1, 100, 100)
    with torch.inference_mode():
        whole = net(x)
        tiled = tiled_apply(net, x, tile=40, halo=0, blend=8)
    assert (tiled - whole).abs().max() < 1.0  # approximate, bounded, and every pixel covered
    assert torch.isfinite(tiled).all()


def test_engine_tiles_large_images_like_whole_image(models_dir: Path) -> None:
    model = load_model_folder(models_dir / "rand-ct")
    stored = np.random.default_rng(4).integers(0, 4000, size=(1, 150, 120)).astype(np.uint16)
    from dicom_node.denoise.pixels import PixelFormat

    fmt = [PixelFormat(16, 12, 0, "MONOCHROME2", 1.0, -1024.0, "HU")]
    whole = Engine(model).denoise_frames(stored, fmt)
    tiled = Engine(model, max_tile_pixels=64 * 64, tile_size=80, tile_blend=8).denoise_frames(stored, fmt)
    assert np.abs(whole.astype(int) - tiled.astype(int)).max() <= 1  # rounding of float differences only


def test_batch_size_is_bounded() -> None:
    net = build_network("unet-res-small")
    b = choose_batch_size(net, 512, 512, torch.device("cpu"))
    assert 1 <= b <= 4
    assert choose_batch_size(net, 512, 512, torch.device("cpu"), max_batch=2) <= 2


def test_multiframe_identity_and_rescale(tmp_path: Path, models_dir: Path) -> None:
    volume = np.random.default_rng(5).integers(0, 4095, size=(5, 16, 16)).astype(np.uint16)
    ds = make_multiframe(volume, slope=2.0, intercept=1.0)
    ds.BitsStored, ds.HighBit = 12, 11
    path = tmp_path / "in" / "mf.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    inst = read_instance_header(path)
    assert inst.frames == 5 and inst.formats[0].slope == 2.0 and inst.formats[0].intercept == 1.0
    model = load_model_folder(models_dir / "id-any")
    result = denoise_series(tmp_path / "in", model, tmp_path / "out")
    (out,) = result.paths
    derived = pydicom.dcmread(out)
    np.testing.assert_array_equal(derived.pixel_array, volume)
    frame = derived.PerFrameFunctionalGroupsSequence[2].DerivationImageSequence[0].SourceImageSequence[0]
    assert frame.ReferencedFrameNumber == 3


def test_model_that_does_not_fit_is_refused(tmp_path: Path, models_dir: Path) -> None:
    write_series(tmp_path / "in", np.zeros((1, 8, 8), np.uint16), modality="MR", slope=None)
    with pytest.raises(SeriesRefused, match="for CT series, not MR"):
        denoise_series(tmp_path / "in", load_model_folder(models_dir / "id-ct"), tmp_path / "out")


def test_colour_is_read_as_rgb_and_other_colour_encodings_are_refused(tmp_path: Path) -> None:
    ds = make_image(np.zeros((4, 4), np.uint8), slope=None)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = bytes(4 * 4 * 3)
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    (series,) = scan([tmp_path]).series
    fmt = series.instances[0].formats[0]
    assert (fmt.photometric, fmt.samples_per_pixel, fmt.bits_allocated) == ("RGB", 3, 8)
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"  # MPEG-2's: nothing here decodes it
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    found = scan([tmp_path])
    assert not found.series
    assert "YBR_PARTIAL_420) is not supported" in found.skipped[0][1]


def test_undecodable_pixels_are_refused_not_crashed(tmp_path: Path, models_dir: Path) -> None:
    ds = make_image(np.zeros((8, 8), np.int16), intercept=0.0)
    ds.PixelData = b"\x00" * 10  # truncated
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "bad.dcm", enforce_file_format=True)
    with pytest.raises(SeriesRefused, match="cannot be decoded|shape"):
        denoise_series(tmp_path / "in", load_model_folder(models_dir / "id-ct"), tmp_path / "out")


def test_non_dicom_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    found = scan([tmp_path])
    assert found.series == [] and found.skipped[0][1] == "not a DICOM file"


def test_jply_is_refused_with_a_clear_error(shared_data: Path, tmp_path: Path, models_dir: Path) -> None:
    found = scan([shared_data / "interop" / "wg04" / "JPLY" / "MR1_JPLY"])
    (series,) = found.series
    with pytest.raises(SeriesRefused, match=r"cannot be decoded \(JPEG Extended"):
        denoise_series(series, load_model_folder(models_dir / "id-any"), tmp_path / "out")


@pytest.mark.parametrize("syntax", ["REF", "RLE", "JPLL", "JLSL", "J2KR"])
def test_lossless_interop_syntaxes_decode_to_the_same_pixels(shared_data: Path, tmp_path: Path, models_dir: Path,
                                                             syntax: str) -> None:
    folder = shared_data / "interop" / "wg04" / syntax
    (src,) = [p for p in folder.iterdir() if p.name.startswith("CT1")]
    ref = pydicom.dcmread(shared_data / "interop" / "wg04" / "REF" / "CT1_UNC").pixel_array
    result = denoise_series([src], load_model_folder(models_dir / "id-ct"), tmp_path / syntax)
    np.testing.assert_array_equal(pydicom.dcmread(result.paths[0]).pixel_array, ref)


@pytest.mark.parametrize("length", [65, 100, 129, 257, 1000, 1760, 2140, 4000])
@pytest.mark.parametrize("halo,blend,multiple", [(0, 8, 1), (24, 8, 4), (56, 32, 8)])
def test_tile_windows_cover_evenly_with_positive_weight(length: int, halo: int, blend: int, multiple: int) -> None:
    from dicom_node.denoise.engine import _axis_weights, _axis_windows

    window = 256
    windows = _axis_windows(length, window, halo, blend, multiple)
    total = np.zeros(length)
    for start, stop in windows:
        assert start % multiple == 0
        assert stop - start <= window + multiple
        total[start:stop] += _axis_weights(start, stop, length, halo, blend)
    assert (total > 0).all()
    # no needless extra tiles: as few as the usable (non-overlapping) part of a tile allows
    assert len(windows) <= math.ceil(length / (window - 2 * halo - blend - 2 * multiple)) + 1


def test_long_series_is_streamed_in_bounded_memory(tmp_path: Path, models_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import dicom_node.denoise.engine as engine_module

    volume = np.zeros((24, 16, 16), dtype=np.uint16)
    write_series(tmp_path / "in", volume, bits_stored=12)
    decoded, written, in_flight = [0], [0], []
    real_read, real_write = engine_module.read_frames, engine_module.DerivedSeriesWriter.write

    def counting_read(inst):  # noqa: ANN001, ANN202
        decoded[0] += 1
        in_flight.append(decoded[0] - written[0])
        return real_read(inst)

    def counting_write(self, *args):  # noqa: ANN001, ANN002, ANN202
        written[0] += 1
        return real_write(self, *args)

    monkeypatch.setattr(engine_module, "read_frames", counting_read)
    monkeypatch.setattr(engine_module.DerivedSeriesWriter, "write", counting_write)
    engine = Engine(load_model_folder(models_dir / "id-ct"), batch_size=2)
    result = denoise_series(tmp_path / "in", engine, tmp_path / "out")
    assert len(result.paths) == 24 and written[0] == 24
    assert max(in_flight) <= 4 * 2  # decoding ahead, computing, writing behind: a few batches, never the series
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in result.paths]
    assert z == sorted(z)  # result paths come back in slice order


def test_durable_output_fsyncs_every_file_and_then_the_folder(tmp_path: Path, models_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    write_series(tmp_path / "in", np.zeros((5, 16, 16), dtype=np.uint16), bits_stored=12)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        mode = os.fstat(fd).st_mode
        synced.append("folder" if stat.S_ISDIR(mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    engine = Engine(load_model_folder(models_dir / "id-ct"), batch_size=2)
    denoise_series(tmp_path / "in", engine, tmp_path / "plain")
    assert synced == []  # the CLI's default: no fsync
    result = denoise_series(tmp_path / "in", engine, tmp_path / "out", durable=True)
    assert len(result.paths) == 5
    assert synced == ["file"] * 5 + ["folder"]  # every file before its rename, the folder once after all


def test_refusal_half_way_leaves_no_partial_series(tmp_path: Path, models_dir: Path) -> None:
    paths = write_series(tmp_path / "in", np.zeros((6, 16, 16), np.int16), intercept=0.0)
    ds = pydicom.dcmread(paths[4])
    ds.PixelData = ds.PixelData[:100]  # the fifth slice in geometric order cannot be decoded
    ds.save_as(paths[4], enforce_file_format=True)
    engine = Engine(load_model_folder(models_dir / "id-ct"), batch_size=1)
    with pytest.raises(SeriesRefused):
        denoise_series(tmp_path / "in", engine, tmp_path / "out")
    assert list((tmp_path / "out").glob("*.dcm")) == []
    assert not list((tmp_path / "out").glob(".*.tmp"))
