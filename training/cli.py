"""``dicom-node train`` and ``dicom-node evaluate`` (also ``python -m training``).

The handlers import the heavy training modules only when they run, so ``dicom-node --help`` stays light and the
node never imports this package's training code at run time.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_file", metavar="CONFIG", help="training config (TOML), e.g. training/configs/ct-cnn.toml")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="folder the config's data paths are relative to (overrides [data] root; default "
                        "$DICOM_NODE_SHARED_DATA, else ../shared/data beside the project)")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--threads", type=int, default=None, help="override train.threads (CPU)")
    p.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="override train.time_limit_minutes: fit the run (and its schedule) into this time")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="also copy the finished model folder here (e.g. models/bundled/<name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="model folder (weights.safetensors + card.toml)")
    p.add_argument("data", metavar="DATA", nargs="*",
                   help="DICOM folders scored at a simulated dose against themselves (relative paths that do not "
                        "exist here are taken from --data)")
    p.add_argument("--data", dest="data_root", default=None, metavar="DIR",
                   help="folder relative DATA paths are taken from (default $DICOM_NODE_SHARED_DATA, else "
                        "../shared/data beside the project)")
    p.add_argument("--real-low-dose", nargs="*", default=[], metavar="DIR",
                   help="real low-dose series without a reference (noise SD, sharpness, texture only)")
    p.add_argument("--nps-reference", default=None, metavar="DIR",
                   help="series whose noise texture the real low-dose outputs are compared with (e.g. the high dose)")
    p.add_argument("--out", default=None,
                   help="report folder (default: evaluation-<MODEL's folder name> beside MODEL, or in the current "
                        "folder when MODEL's parent is not writable)")
    p.add_argument("--dose", type=float, default=0.25, help="simulated dose fraction (default 0.25)")
    p.add_argument("--window", type=float, nargs=2, default=[-160.0, 240.0], metavar=("LOW", "HIGH"),
                   help="HU window for PSNR/SSIM (default -160 240: W400 L40)")
    p.add_argument("--fbp-cutoff", type=float, default=None,
                   help="CT: FBP Hann window cutoff (fraction of Nyquist) of the simulated noise; default the "
                        "model card's; 0.3 matches the noise power spectrum of the Philips head phantom scans")
    p.add_argument("--baseline", choices=["bm3d", "nlm", "none"], default="bm3d")
    p.add_argument("--slices", type=int, default=6, help="slices per series, evenly spread (default 6)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache", default="runs/.baseline-cache", help="folder caching baseline outputs")
    p.add_argument("--write-card", action="store_true", help="store the measured metrics in the model's card")
    p.add_argument("--split", default=None, metavar="FILE",
                   help="a patient split (training/splits/ct.toml, or its name: ct): score its held-out "
                        "'validation' folders (added to DATA) and its 'noise' folders as real low dose")
    p.add_argument("--detectability", action="store_true",
                   help="CT: also run the low-contrast detectability test (discs of 3-10 mm, 3-20 HU inserted "
                        "before the noise, NPW model observer, bootstrap 95%% intervals; training/detectability.py)")
    p.add_argument("--lcd-realisations", type=int, default=100,
                   help="detectability: noise realisations per dose (default 100)")
    p.add_argument("--lcd-doses", type=float, nargs="*", default=[0.1, 0.25, 0.55, 1.0],
                   help="detectability: dose fractions (default 0.1 0.25 0.55 1.0)")
    p.add_argument("--lcd-slices", type=int, default=1,
                   help="detectability: slices (one per CT series of DATA, in order; default 1)")
    p.add_argument("--lcd-kernel", default="ge-standard",
                   help="detectability: reconstruction kernel of the simulated noise (training.noise.KERNELS)")


def _fail(command: str, message: str) -> int:
    print(f"dicom-node {command}: {message}", file=sys.stderr)
    return 2


def _missing_data(paths: list[tuple[str, Path]], root: Path, how: str) -> str | None:
    """One line naming the first data folder that does not exist and how to point at the site's own, or None."""
    for name, path in paths:
        if not path.exists():
            return (f"data folder {name!r} not found: {path} does not exist (data paths are relative to {root}; "
                    f"{how})")
    return None


def run_train(args: argparse.Namespace) -> int:
    import shutil

    from training.config import TrainingConfigError, load_config
    from training.loops import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config_file)
    except TrainingConfigError as exc:
        return _fail("train", str(exc).replace("\n", "; "))
    if args.data:
        cfg.data.root = str(Path(args.data).expanduser().resolve())
    d = cfg.data
    names = [n for pair in d.real_pairs for n in pair] if d.pairs == "real" else list(d.train)
    names += list(d.validation) if d.pairs != "real" else []
    missing = _missing_data([(n, cfg.data_path(n)) for n in names], cfg.data_root(),
                            "point at the site's own folders with --data DIR, [data] root in the config, or "
                            "$DICOM_NODE_SHARED_DATA")
    if missing:
        return _fail("train", missing)
    if args.steps:
        cfg.train.steps = args.steps
    if args.threads:
        cfg.train.threads = args.threads
    if args.time_limit is not None:
        cfg.train.time_limit_minutes = args.time_limit
    try:
        result = train(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
    except (FileNotFoundError, TrainingConfigError) as exc:  # e.g. a data folder without any DICOM series
        return _fail("train", str(exc))
    print(f"{cfg.name}: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.4g} -> "
          f"{result.final_loss:.4g}; run folder {result.run_dir}")
    if result.model_dir and args.export:
        dest = Path(args.export)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(result.model_dir, dest)
        print(f"model folder copied to {dest}")
    return 0


def default_report_folder(model: str) -> Path:
    """``evaluation-<model folder name>`` beside the model folder, or in the current folder when that is not
    writable (a model installed with the package)."""
    folder = Path(model).resolve()
    beside = folder.parent
    if os.access(beside, os.W_OK | os.X_OK):
        return beside / f"evaluation-{folder.name}"
    return Path.cwd() / f"evaluation-{folder.name}"


def run_evaluate(args: argparse.Namespace) -> int:
    import time

    from training.data import shared_data_dir

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if getattr(args, "split", None):
        from training.splits import SplitError, load_split

        try:
            split = load_split(args.split)
        except SplitError as exc:
            return _fail("evaluate", str(exc).replace("\n", "; "))
        args.data = [*args.data, *split.folders("validation")]
        args.real_low_dose = [*args.real_low_dose, *split.folders("noise")]
    if not args.data and not args.real_low_dose:
        return _fail("evaluate", "give DATA folders and/or --real-low-dose folders (or --split)")
    if not (Path(args.model) / "card.toml").is_file():
        return _fail("evaluate", f"{args.model} is not a model folder (no card.toml)")
    root = Path(args.data_root).expanduser().resolve() if args.data_root else shared_data_dir()

    def resolve(name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() or path.exists() else root / path

    data = [str(resolve(n)) for n in args.data]
    real = [str(resolve(n)) for n in args.real_low_dose]
    reference = str(resolve(args.nps_reference)) if args.nps_reference else None
    named = [*args.data, *args.real_low_dose, *([args.nps_reference] if args.nps_reference else [])]
    missing = _missing_data(list(zip(named, map(Path, [*data, *real, *([reference] if reference else [])]))), root,
                            "give existing folders, or --data DIR for relative ones")
    if missing:
        return _fail("evaluate", missing)
    out = Path(args.out) if args.out else default_report_folder(args.model)
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    progress(f"evaluating {args.model}; report in {out}")
    recipe = _recipe_of_model(args.model)
    if recipe is not None:  # MR, X-ray, ultrasound, endoscopy: their own images, noise and baselines
        # Recipes that cache their classical baselines (BM3D is the slow part) take --cache too.
        takes_cache = "cache_dir" in inspect.signature(recipe.evaluate).parameters
        cache = {"cache_dir": args.cache} if args.cache and takes_cache else {}
        recipe.evaluate(args.model, data, out, seed=args.seed, max_images=args.slices, progress=progress,
                        write_card=args.write_card, **cache)
        print((out / "table.md").read_text())
        print(f"report in {out}")
        return 0
    from training.evaluate import evaluate

    lcd = None
    if getattr(args, "detectability", False):
        from training.detectability import LCDSettings

        lcd = LCDSettings(doses=tuple(args.lcd_doses), realisations=args.lcd_realisations, kernel=args.lcd_kernel)
    evaluate(args.model, data, out, real_low_dose=real, nps_reference=reference, dose=args.dose,
             window=args.window, baseline=args.baseline, max_slices=args.slices, seed=args.seed,
             cache_dir=args.cache, write_card=args.write_card, fbp_cutoff=args.fbp_cutoff, progress=progress,
             detectability=lcd, detectability_slices=getattr(args, "lcd_slices", 1))
    print((out / "table.md").read_text())
    if lcd is not None:
        print((out / "detectability.md").read_text())
    print(f"report in {out}")
    return 0


def _recipe_of_model(model: str):  # noqa: ANN202 - a recipe module or None
    """The :mod:`training.modalities` recipe that scores ``model`` (by its card's first modality), or ``None``."""
    from models.folder import read_card
    from training.modalities import recipe_for_modality

    card = read_card(model)
    return recipe_for_modality(card.modalities[0]) if card.modalities else None


def run_calibrate(args: argparse.Namespace) -> int:
    from training.calibration import main

    return main(args)


def register(subparsers) -> None:
    """Add ``train``, ``evaluate`` and ``calibrate-noise`` to the ``dicom-node`` command line."""
    p = subparsers.add_parser("train", help="train a denoising model from a TOML config (training package)")
    add_train_arguments(p)
    p.set_defaults(handler=run_train)
    p = subparsers.add_parser("evaluate", help="score a model folder on DICOM series against baselines")
    add_evaluate_arguments(p)
    p.set_defaults(handler=run_evaluate)
    p = subparsers.add_parser("calibrate-noise", help="check the CT noise simulator against the phantom doses")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.set_defaults(handler=run_calibrate)


def main(argv=None) -> int:
    """``python -m training CONFIG`` trains; ``python -m training evaluate|calibrate-noise ...`` as the node CLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub)
    if argv and argv[0] not in {"train", "evaluate", "calibrate-noise", "-h", "--help"}:
        argv = ["train", *argv]
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)
