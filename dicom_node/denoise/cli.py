"""Commands of the denoising core: ``dicom-node denoise`` and ``dicom-node models list|show``.

``denoise`` is also how users try the node without a network: it denoises a folder of DICOM files (one or more
series) into an output folder, one sub-folder per derived series, with a progress bar and, on request, a
before/after/difference PNG per series.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``denoise`` and ``models`` commands."""
    from dicom_node.cli import add_config_argument

    p = subparsers.add_parser(
        "denoise", help="denoise a folder of DICOM files into derived series (offline, no network)",
        description="Denoise every image series found under INPUT and write the derived series into OUTPUT "
                    "(one folder per series, named by its new SeriesInstanceUID).",
    )
    p.add_argument("input", metavar="INPUT", type=Path, help="DICOM file or folder (searched recursively)")
    p.add_argument("output", metavar="OUTPUT", type=Path, help="output folder (created)")
    p.add_argument("--model", "-m", default=None,
                   help="model name or model folder (default: the first installed model that fits each series)")
    p.add_argument("--strength", "-s", type=float, default=1.0, help="blend of output and input in [0, 1] (default 1)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: [models] device)")
    p.add_argument("--batch-size", type=int, default=None, help="slices per batch (default: chosen from free memory)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--preview", action="store_true", help="write OUTPUT/<series>.png: before | after | difference")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_argument(p)
    p.set_defaults(handler=run_denoise)

    m = subparsers.add_parser("models", help="list or show the installed models")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    ml = msub.add_parser("list", help="list the models on the search path")
    add_config_argument(ml)
    ml.set_defaults(handler=run_models_list)
    ms = msub.add_parser("show", help="print a model's card, size and cost")
    ms.add_argument("name", metavar="NAME", help="model name or model folder")
    add_config_argument(ms)
    ms.set_defaults(handler=run_models_show)


def _select_model(name: str | None, modality: str, unit: str | None, directories: list[str]) -> Path:
    """The folder of the model to use: the named one, or the first installed model whose card fits."""
    from models.folder import ModelMismatch, ModelNotFound, find_model, list_models

    if name:
        return find_model(name, directories)
    for entry in list_models(directories):
        if entry.card is None:
            continue
        try:
            entry.card.check_fits(modality, unit)
        except ModelMismatch:
            continue
        return entry.path
    raise ModelNotFound(f"no installed model fits {modality} series; pass --model NAME or a model folder "
                        "(see `dicom-node models list`)")


def run_denoise(args: argparse.Namespace) -> int:
    """Handler of ``dicom-node denoise``."""
    import torch
    from tqdm import tqdm

    from dicom_node.cli import config_from_args
    from dicom_node.denoise.derived import DerivedSeriesSettings, new_series_uid
    from dicom_node.denoise.engine import Engine, denoise_series, series_unit
    from dicom_node.denoise.errors import SeriesRefused
    from dicom_node.denoise.preview import preview_image, write_png
    from dicom_node.denoise.series import scan
    from models.folder import ModelError, load_model_folder

    cfg = config_from_args(args)
    if not 0.0 <= args.strength <= 1.0:
        print(f"dicom-node denoise: --strength {args.strength} is outside [0, 1]", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if cfg.models.keep_freed_cpu_memory:
        from dicom_node.cpu_memory import keep_freed_memory

        keep_freed_memory()  # as `serve` does: the denoise threads start below
    if not args.input.exists():
        print(f"dicom-node denoise: {args.input} does not exist", file=sys.stderr)
        return 2
    device = args.device or cfg.models.device
    settings = DerivedSeriesSettings.from_config(cfg.derived)
    found = scan([args.input])
    if not found.series:
        print(f"dicom-node denoise: no DICOM image series under {args.input}", file=sys.stderr)
        return 1
    if found.skipped:
        print(f"skipped {len(found.skipped)} files that are not denoisable images "
              f"(first: {found.skipped[0][0].name}: {found.skipped[0][1]})", file=sys.stderr)
    args.output.mkdir(parents=True, exist_ok=True)
    engines: dict[Path, Engine] = {}
    failures = 0
    total = sum(s.frame_count for s in found.series)
    with tqdm(total=total, unit="slice", disable=args.no_progress, file=sys.stderr) as bar:
        for series in found.series:
            try:
                folder = _select_model(args.model, series.modality, series_unit(series), cfg.models.directories)
                if folder not in engines:
                    engines[folder] = Engine(load_model_folder(folder, device), batch_size=args.batch_size)
                engine = engines[folder]
                uid = new_series_uid()
                result = denoise_series(series, engine, args.output / uid, strength=args.strength,
                                        settings=settings, series_instance_uid=uid, progress=bar.update,
                                        keep_preview=args.preview)
            except (SeriesRefused, ModelError) as exc:
                failures += 1
                bar.update(series.frame_count)
                print(f"refused {series.describe()}: {exc}", file=sys.stderr)
                continue
            if args.preview and result.preview is not None:
                before, after, fmt = result.preview
                write_png(args.output / f"{uid}.png", preview_image(before, after, fmt))
            bar.write(f"{series.describe()} -> {args.output / uid} ({len(result.paths)} files, "
                      f"{result.frames / max(result.seconds, 1e-9):.1f} slices/s)")
    return 1 if failures else 0


def run_models_list(args: argparse.Namespace) -> int:
    """Handler of ``dicom-node models list``."""
    from dicom_node.cli import config_from_args
    from models.folder import list_models, model_search_path

    cfg = config_from_args(args)
    entries = list_models(cfg.models.directories)
    if not entries:
        searched = ", ".join(str(p) for p in model_search_path(cfg.models.directories))
        print(f"no models installed (searched {searched})")
        return 0
    print(f"{'NAME':<24} {'VERSION':<10} {'ARCHITECTURE':<16} {'MODALITIES':<12} {'SHA256':<12}  PATH")
    for e in entries:
        if e.card is None:
            print(f"{'(invalid)':<24} {'':<10} {'':<16} {'':<12} {'':<12}  {e.path}: {e.error.splitlines()[0]}")
            continue
        c = e.card
        print(f"{c.name:<24} {c.version:<10} {c.architecture:<16} {','.join(c.modalities):<12} "
              f"{c.sha256[:12]:<12}  {e.path}")
    return 0


def run_models_show(args: argparse.Namespace) -> int:
    """Handler of ``dicom-node models show NAME``."""
    from dicom_node.cli import config_from_args
    from models.folder import ModelError, find_model, read_card, sha256_file
    from models.networks import build_network, describe

    cfg = config_from_args(args)
    try:
        folder = find_model(args.name, cfg.models.directories)
        card = read_card(folder)
    except ModelError as exc:
        print(f"dicom-node models show: {exc}", file=sys.stderr)
        return 1
    print(f"# {folder}")
    print(card.to_toml(), end="")
    stats = describe(build_network(card.architecture, **card.arguments))
    weights = folder / "weights.safetensors"
    ok = weights.is_file() and sha256_file(weights) == card.sha256
    print(f"\n# parameters: {stats['parameters']:,}; {stats['gflop_per_slice']:.1f} GFLOP per 512x512 slice; "
          f"weights {'match' if ok else 'DO NOT MATCH'} the card's sha256")
    return 0 if ok else 1
