"""``dicom-node train`` and ``dicom-node evaluate`` (also ``python -m training``).

The handlers import the heavy training modules only when they run, so ``dicom-node --help`` stays light and the
node never imports this package's training code at run time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_file", metavar="CONFIG", help="training config (TOML), e.g. training/configs/ct-cnn.toml")
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
                   help="DICOM folders scored at a simulated dose against themselves (relative paths: shared data)")
    p.add_argument("--real-low-dose", nargs="*", default=[], metavar="DIR",
                   help="real low-dose series without a reference (noise SD, sharpness, texture only)")
    p.add_argument("--nps-reference", default=None, metavar="DIR",
                   help="series whose noise texture the real low-dose outputs are compared with (e.g. the high dose)")
    p.add_argument("--out", default=None, help="report folder (default: <model>/../evaluation or ./evaluation)")
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


def run_train(args: argparse.Namespace) -> int:
    import shutil

    from training.config import load_config
    from training.loops import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    cfg = load_config(args.config_file)
    if args.steps:
        cfg.train.steps = args.steps
    if args.threads:
        cfg.train.threads = args.threads
    if args.time_limit is not None:
        cfg.train.time_limit_minutes = args.time_limit
    result = train(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress)
    print(f"{cfg.name}: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.4g} -> "
          f"{result.final_loss:.4g}; run folder {result.run_dir}")
    if result.model_dir and args.export:
        dest = Path(args.export)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(result.model_dir, dest)
        print(f"model folder copied to {dest}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if not args.data and not args.real_low_dose:
        print("evaluate: give DATA folders and/or --real-low-dose folders", file=sys.stderr)
        return 2
    out = args.out or str(Path(args.model).resolve().parent / f"evaluation-{Path(args.model).name}")
    metrics = evaluate(args.model, args.data, out, real_low_dose=args.real_low_dose,
                       nps_reference=args.nps_reference, dose=args.dose, window=args.window,
                       baseline=args.baseline, max_slices=args.slices, seed=args.seed, cache_dir=args.cache,
                       write_card=args.write_card, fbp_cutoff=args.fbp_cutoff)
    print((Path(out) / "table.md").read_text())
    print(f"report in {out}")
    return 0


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
