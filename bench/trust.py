"""Calibration of the trust check (dicom_node/denoise/trust.py) on the real CT series of the shared data.

Honest cases: every bundled CT model (``models/bundled/*/card.toml`` with CT among its modalities) at strengths 1.0
and 0.5 on every CT series under the shared data's ``ct`` folder (at most ``--max-slices`` evenly spaced slices per
series, as the worker keeps for the check). Bad "models" are made from the honest output of ``ct-cnn-small`` at
1.0: a +/-20 HU shift, a Gaussian blur (sigma 1.5 px), a painted 8 mm disc of 20 and of 40 HU (in each checked
slice, in soft tissue inside the body) and a +/-10 HU checkerboard of 2-pixel period. Each case is checked as the
worker checks a job (``dicom_node.denoise.worker.trust_check``); a bad case is caught when it fails. Prints one
row per case and a summary (false alarms, catches per bad kind, seconds per check).

    .venv/bin/python bench/trust.py                                  # all CT series, 16 slices each
    .venv/bin/python bench/trust.py --max-series 2 --json /tmp/trust.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.denoise.engine import DenoiseResult, Engine, _row_spacing, check_model_fits  # noqa: E402
from dicom_node.denoise.errors import SeriesRefused  # noqa: E402
from dicom_node.denoise.pixels import PixelFormat, physical_to_stored, stored_to_physical  # noqa: E402
from dicom_node.denoise.series import Series, read_frames, scan  # noqa: E402
from dicom_node.denoise.trust import DEFAULT_PIXEL_SPACING_MM, TrustResult  # noqa: E402
from dicom_node.denoise.worker import TRUST_FRAMES, trust_check  # noqa: E402
from models.folder import ModelError, bundled_models_dir, load_model_folder, read_card  # noqa: E402
from tests.helpers import shared_data_dir  # noqa: E402

LOGGER = logging.getLogger(__name__)

STRENGTHS = (1.0, 0.5)
#: The scored numbers of the check (and blob_z, recorded), in the table's order.
SCORED = ("edge_ratio", "bias", "nps_excess", "sfrc", "blob_z")
#: Soft tissue (HU, after smoothing; contrast-enhanced organs included) where a disc is painted; its centre is the
#: point deepest inside it.
SOFT_TISSUE_HU = (0.0, 150.0)
#: The air value that padding and below-air pixels are set to before blurring (as the check flattens them).
AIR_HU = -1024.0


@dataclass
class Frames:
    """The checked slices of one series: stored values, their formats and the row pixel spacing (mm)."""

    label: str
    stored: np.ndarray  # (frames, rows, columns)
    formats: list[PixelFormat]
    spacing_mm: float | None


def series_label(series: Series, data: Path) -> str:
    """``folder/within/data #SeriesNumber``, with the file's name for a one-file series (several of those share a
    folder and a SeriesNumber)."""
    first = series.instances[0].path
    where = first.parent if len(series.instances) > 1 else first.with_suffix("")
    try:
        name = where.relative_to(data).as_posix()
    except ValueError:
        name = where.as_posix()
    return f"{name} #{series.first.get('SeriesNumber', '?')}"


def load_frames(series: Series, label: str, max_slices: int) -> Frames:
    """Up to ``max_slices`` evenly spaced grey frames of the series (those of the first frame's size), decoded
    with the node's reader; raises ``SeriesRefused`` as the node would."""
    flat = [(inst, k) for inst in series.instances for k in range(inst.frames)]
    picks = np.unique(np.linspace(0, len(flat) - 1, min(max_slices, len(flat))).round().astype(int))
    decoded: dict[int, tuple[Any, np.ndarray]] = {}
    frames: list[np.ndarray] = []
    formats: list[PixelFormat] = []
    spacing: float | None = None
    for p in picks:
        inst, k = flat[int(p)]
        if inst.formats[k].is_colour:
            raise SeriesRefused("colour frames: the CT models are grey")
        if id(inst) not in decoded:
            decoded = {id(inst): read_frames(inst)}  # one instance at a time: a multi-frame one is read once
            if spacing is None:
                spacing = _row_spacing(decoded[id(inst)][0])
        frame = decoded[id(inst)][1][k]
        if frames and frame.shape != frames[0].shape:
            continue  # frames of mixed sizes: those of the first size, as the worker's check does
        frames.append(frame)
        formats.append(inst.formats[k])
    return Frames(label, np.stack(frames), formats, spacing)


class ReusingEngine(Engine):
    """The node's engine, keeping the network's residuals of the current series: the same frames at strength 0.5
    need no second run of the network (the strength blends the residual in afterwards, as in the node)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._residuals: dict[tuple[tuple[int, ...], bytes], np.ndarray] = {}

    def forget(self) -> None:
        """Drop the kept residuals (a new series)."""
        self._residuals.clear()

    def residual(self, x: np.ndarray) -> np.ndarray:
        key = (x.shape, hashlib.sha1(np.ascontiguousarray(x).tobytes()).digest())
        if key not in self._residuals:
            self._residuals[key] = super().residual(x)
        return self._residuals[key]


def ct_model_folders(names: list[str] | None) -> list[Path]:
    """The bundled model folders whose card lists CT (``names``: only these)."""
    out = []
    for folder in sorted(p for p in bundled_models_dir().iterdir() if (p / "card.toml").is_file()):
        card = read_card(folder)
        if "CT" in card.modalities and (not names or card.name in names):
            out.append(folder)
    return out


# ------------------------------------------------------------------------------------------------- bad models


def _disc_centre(before: np.ndarray, radius_px: float) -> tuple[int, int] | None:
    """The point deepest inside soft tissue (smoothed input in :data:`SOFT_TISSUE_HU`), if a disc of
    ``radius_px`` with a 2-pixel margin fits there."""
    smooth = ndimage.gaussian_filter(before, 2.0)
    soft = (smooth >= SOFT_TISSUE_HU[0]) & (smooth <= SOFT_TISSUE_HU[1])
    soft = ndimage.binary_opening(soft, iterations=2)
    if not soft.any():
        return None
    depth = ndimage.distance_transform_edt(np.pad(soft, 1))[1:-1, 1:-1]  # the image's border is not tissue
    r, c = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return (int(r), int(c)) if float(depth[r, c]) >= radius_px + 2.0 else None


def make_bad(kind: str, value: float, before: np.ndarray, after: np.ndarray, fmt: PixelFormat,
             spacing_mm: float, args: argparse.Namespace) -> np.ndarray | None:
    """Stored values of a bad model's output for one frame, made from the honest output ``after`` (stored values);
    ``None`` when the frame has no place for it (a disc without soft tissue large enough)."""
    y = stored_to_physical(after, fmt)
    pad = fmt.padding_mask(before)
    keep = np.zeros(y.shape, bool) if pad is None else pad
    if kind == "shift":
        y = y + value
    elif kind == "blur":
        y = ndimage.gaussian_filter(np.where(keep, AIR_HU, np.maximum(y, AIR_HU)), value)
    elif kind == "disc":
        radius = args.disc_mm / 2.0 / spacing_mm
        centre = _disc_centre(stored_to_physical(before, fmt), radius)
        if centre is None:
            return None
        rr, cc = np.ogrid[:y.shape[0], :y.shape[1]]
        y = y + (np.hypot(rr - centre[0], cc - centre[1]) < radius) * value
    elif kind == "checker":
        half = max(1, args.checker_period // 2)
        rr, cc = np.ogrid[:y.shape[0], :y.shape[1]]
        y = y + np.where((rr // half + cc // half) % 2 == 0, value, -value)
    else:
        raise ValueError(f"unknown bad model {kind}")
    out = physical_to_stored(y, fmt)
    out[keep] = after[keep]
    return out


def bad_kinds(args: argparse.Namespace) -> list[tuple[str, str, float]]:
    """(label, kind, value) of each bad model."""
    return ([(f"shift{s:+g}", "shift", s) for s in (args.shift_hu, -args.shift_hu)]
            + [(f"blur{args.blur_sigma:g}", "blur", args.blur_sigma)]
            + [(f"disc{c:g}", "disc", c) for c in args.disc_hu]
            + [(f"checker{args.checker_hu:g}", "checker", args.checker_hu)])


# ------------------------------------------------------------------------------------------------- checking


def check(frames: Frames, after: np.ndarray) -> tuple[TrustResult | None, float]:
    """The worker's trust check of (input, output) and its seconds."""
    result = DenoiseResult(paths=[], series_instance_uid="", source_series_instance_uid="", frames=len(after),
                           seconds=0.0, samples=[(b, a, f) for b, a, f in zip(frames.stored, after, frames.formats)],
                           pixel_spacing_mm=frames.spacing_mm)
    start = time.perf_counter()
    trust = trust_check(result)
    return trust, time.perf_counter() - start


def row(frames: Frames, model: str, strength: float | str, trust: TrustResult | None, seconds: float) -> dict:
    shape = frames.stored.shape
    out: dict[str, Any] = {"series": frames.label, "frames": int(shape[0]), "size": f"{shape[1]}x{shape[2]}",
                           "spacing_mm": frames.spacing_mm, "model": model, "strength": strength,
                           "seconds": round(seconds, 3)}
    if trust is None:
        out.update(verdict="error", score=None, checks={}, reasons=["the check could not run (see the log)"])
    else:
        out.update(verdict=trust.verdict, score=trust.score, checks=trust.checks, reasons=trust.reasons)
    return out


HEADER = (f"{'series':<52} {'frames':>9} {'model':<16} {'str':>4} {'verdict':<7} {'score':>5} "
          + " ".join(f"{name:>10}" for name in SCORED) + f" {'s':>5}  reasons")


def print_row(r: dict) -> None:
    strength = f"{r['strength']:g}" if isinstance(r["strength"], float) else str(r["strength"])
    numbers = " ".join(f"{r['checks'][n]:>10.3f}" if n in r["checks"] else f"{'-':>10}" for n in SCORED)
    score = f"{r['score']:.2f}" if r["score"] is not None else "-"
    print(f"{r['series'][-52:]:<52} {r['frames']:>3}x{r['size']:<5} {r['model']:<16} {strength:>4} "
          f"{r['verdict']:<7} {score:>5} {numbers} {r['seconds']:>5.2f}  {'; '.join(r['reasons'])}", flush=True)


def summarise(rows: list[dict], kinds: list[str]) -> dict[str, Any]:
    honest = [r for r in rows if r["strength"] != "bad"]
    per_model = {f"{m} {s:g}": dict(Counter(r["verdict"] for r in honest if (r["model"], r["strength"]) == (m, s)))
                 for m, s in dict.fromkeys((r["model"], r["strength"]) for r in honest)}
    bad = {k: dict(Counter(r["verdict"] for r in rows if r["strength"] == "bad" and r["model"] == k)) for k in kinds}
    seconds = [r["seconds"] for r in rows if r["verdict"] != "error"]
    full = [r["seconds"] for r in rows if r["verdict"] != "error" and r["frames"] == max(x["frames"] for x in rows)
            and r["size"] == "512x512"]
    return {"honest": dict(Counter(r["verdict"] for r in honest)), "honest_cases": len(honest),
            "honest_per_model": per_model, "bad": bad,
            "seconds_per_check": {"checks": len(seconds), "mean": statistics.fmean(seconds) if seconds else 0.0,
                                  "median": statistics.median(seconds) if seconds else 0.0,
                                  "max": max(seconds, default=0.0),
                                  "mean_full_512": statistics.fmean(full) if full else None,
                                  "full_512_checks": len(full)}}


def print_summary(summary: dict[str, Any], series: int, skipped: int, wall: float,
                  model_seconds: dict[str, float]) -> None:
    h = summary["honest"]
    print(f"\nsummary: {series} series checked ({skipped} skipped)")
    print(f"honest cases (false alarms = fail): {summary['honest_cases']}: pass {h.get('pass', 0)}, "
          f"warn {h.get('warn', 0)}, fail {h.get('fail', 0)}, error {h.get('error', 0)}")
    for name, counts in summary["honest_per_model"].items():
        print(f"  {name:<20} pass {counts.get('pass', 0):>3}  warn {counts.get('warn', 0):>3}  "
              f"fail {counts.get('fail', 0):>3}")
    print("bad models (caught = fail):")
    for kind, counts in summary["bad"].items():
        n = sum(counts.values())
        print(f"  {kind:<20} fail {counts.get('fail', 0):>3}/{n:<3} warn {counts.get('warn', 0):>3}  "
              f"pass {counts.get('pass', 0):>3}" + (f"  error {counts['error']}" if counts.get("error") else ""))
    s = summary["seconds_per_check"]
    full = (f"; {s['mean_full_512']:.2f} s per full check ({s['full_512_checks']} checks of the most frames "
            "at 512x512)" if s["mean_full_512"] is not None else "")
    print(f"trust check: {s['checks']} checks, {s['mean']:.2f} s mean, {s['median']:.2f} s median, "
          f"{s['max']:.2f} s max{full}")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in model_seconds.items())
    print(f"models (both strengths): {spent}; wall time {wall:.0f} s; load average {os.getloadavg()[0]:.2f} at end")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of CT series (default: the shared data's ct folder, $DICOM_NODE_SHARED_DATA "
                             "or ../shared/data)")
    parser.add_argument("--max-slices", type=int, default=TRUST_FRAMES,
                        help=f"slices per series, evenly spaced (default {TRUST_FRAMES}, as the worker keeps)")
    parser.add_argument("--max-series", type=int, default=0, help="check at most this many series (0: all)")
    parser.add_argument("--models", nargs="*", default=None, help="bundled CT models (default: every one)")
    parser.add_argument("--bad-from", default="ct-cnn-small",
                        help="the model whose output at strength 1.0 the bad models are made from")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--shift-hu", type=float, default=20.0, help="mean shift, both signs (HU)")
    parser.add_argument("--blur-sigma", type=float, default=1.5, help="Gaussian blur sigma (pixels)")
    parser.add_argument("--disc-hu", type=float, nargs="*", default=[20.0, 40.0], help="painted disc contrasts (HU)")
    parser.add_argument("--disc-mm", type=float, default=8.0, help="painted disc diameter (mm)")
    parser.add_argument("--checker-hu", type=float, default=10.0, help="checkerboard amplitude (+/- HU)")
    parser.add_argument("--checker-period", type=int, default=2, help="checkerboard period (pixels, even)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the summary here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dicom_node.denoise.series").setLevel(logging.ERROR)  # one RescaleType quirk per file
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data = (args.data or shared_data_dir() / "ct").resolve()
    if not data.is_dir():
        print(f"bench/trust.py: {data} is not a folder (set DICOM_NODE_SHARED_DATA or pass --data)", file=sys.stderr)
        return 2
    folders = ct_model_folders(args.models)
    if not folders:
        print("bench/trust.py: no bundled CT model", file=sys.stderr)
        return 2
    engines: list[ReusingEngine] = []
    for folder in folders:
        try:
            engines.append(ReusingEngine(load_model_folder(folder, "cpu"), device="cpu"))
        except ModelError as exc:
            print(f"bench/trust.py: {exc}", file=sys.stderr)
            return 2
    engines = [e for e in engines if not e.context]  # sampled slices are not neighbours: context models are out
    names = [e.card.name for e in engines]
    if args.bad_from not in names:
        print(f"bench/trust.py: --bad-from {args.bad_from} is not among the CT models {names}", file=sys.stderr)
        return 2
    found = scan([data])
    labelled = sorted(((series_label(s, data), s) for s in found.series if s.modality == "CT"), key=lambda p: p[0])
    if args.max_series:
        labelled = labelled[:args.max_series]
    kinds = bad_kinds(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start")
    print(f"data {data}: {len(labelled)} CT series; models {', '.join(names)} at strengths "
          f"{', '.join(f'{s:g}' for s in STRENGTHS)}; bad models from {args.bad_from} 1.0: "
          f"{', '.join(k for k, _kind, _v in kinds)}; up to {args.max_slices} slices per series\n")
    print(HEADER)

    rows: list[dict] = []
    skipped = 0
    model_seconds: dict[str, float] = {}
    for label, series in labelled:
        try:
            frames = load_frames(series, label, args.max_slices)
            for engine in engines:
                check_model_fits(series, engine.model)
        except SeriesRefused as exc:
            skipped += 1
            print(f"{label[-52:]:<52} skipped: {exc}", flush=True)
            continue
        spacing = frames.spacing_mm or DEFAULT_PIXEL_SPACING_MM  # as the check assumes
        for engine in engines:
            engine.forget()
            for strength in STRENGTHS:
                mark = time.perf_counter()
                try:
                    after = engine.denoise_frames(frames.stored, frames.formats, strength)
                except SeriesRefused as exc:
                    print(f"{label[-52:]:<52} {engine.card.name} refused: {exc}", flush=True)
                    break
                model_name = engine.card.name
                model_seconds[model_name] = model_seconds.get(model_name, 0.0) + time.perf_counter() - mark
                trust, seconds = check(frames, after)
                rows.append(row(frames, engine.card.name, strength, trust, seconds))
                print_row(rows[-1])
                if engine.card.name != args.bad_from or strength != 1.0:
                    continue
                for name, kind, value in kinds:
                    made = [make_bad(kind, value, b, a, f, spacing, args)
                            for b, a, f in zip(frames.stored, after, frames.formats)]
                    if all(m is None for m in made):
                        print(f"{label[-52:]:<52} {name}: no soft tissue for a disc in any slice", flush=True)
                        continue
                    bad = np.stack([a if m is None else m for a, m in zip(after, made)])
                    trust, seconds = check(frames, bad)
                    r = row(frames, name, "bad", trust, seconds)
                    r["painted_frames"] = sum(m is not None for m in made)
                    rows.append(r)
                    print_row(r)
    wall = time.perf_counter() - started
    summary = summarise(rows, [k for k, _kind, _v in kinds])
    print_summary(summary, len({r["series"] for r in rows}), skipped, wall, model_seconds)
    if args.json:
        args.json.write_text(json.dumps({"arguments": {k: (str(v) if isinstance(v, Path) else v)
                                                       for k, v in vars(args).items()},
                                         "summary": summary, "rows": rows, "wall_seconds": round(wall, 1)},
                                        indent=1))
        print(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
