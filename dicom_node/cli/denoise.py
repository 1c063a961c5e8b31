"""Commands of the denoising core: ``dicom-node denoise`` and ``dicom-node models list|show``.

``denoise`` is also how users try the node without a network: it denoises a folder of DICOM files (one or more
series) into an output folder, one sub-folder per derived series, with a progress bar and, on request, a
before/after/difference PNG per series.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.cli import add_config_argument, config_from_args
from dicom_node.config import Config
from dicom_node.denoise.cpu_memory import keep_freed_memory
from dicom_node.denoise.errors import SeriesRefused

LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``denoise`` and ``models`` commands."""
    p = subparsers.add_parser(
        "denoise", help="denoise a folder of DICOM files into derived series (offline, no network)",
        description="Denoise every image series found under INPUT and write the derived series into OUTPUT "
                    "(one folder per series, named by its new SeriesInstanceUID).",
    )
    p.add_argument("input", metavar="INPUT", type=Path, help="DICOM file or folder (searched recursively)")
    p.add_argument("output", metavar="OUTPUT", type=Path, help="output folder (created)")
    p.add_argument("--model", "-m", default=None,
                   help="model name or model folder (default: per series, the model the node would use: the "
                        "matching rule's of --config, else the bundled model for the modality and device, "
                        "ct-cnn-small on a CPU and ct-cnn on a GPU for CT)")
    p.add_argument("--strength", "-s", type=float, default=None,
                   help="blend of output and input in [0, 1] (default: the rule's strength, else the model's "
                        "usual one: 0.5 for ct-cnn-small, 1 for the others)")
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
    shown = ms.add_mutually_exclusive_group()
    shown.add_argument("--all", action="store_true", help="print the whole card (every measured metric) as TOML")
    shown.add_argument("--json", action="store_true", help="print the whole card and the network's size as JSON")
    add_config_argument(ms)
    ms.set_defaults(handler=run_models_show)


#: The bundled model for a modality when no rule names one, per device type, with the strength it is used at.
#: ct-cnn-small at 1.0 flattens grey-white contrast on a real head CT, hence 0.5 (README, "Models and training").
DEFAULT_MODELS: dict[tuple[str, str], tuple[str, float]] = {
    ("CT", "cpu"): ("ct-cnn-small", 0.5),
    ("CT", "cuda"): ("ct-cnn", 1.0),
    ("MR", "cpu"): ("mr-cnn", 1.0),
    ("MR", "cuda"): ("mr-cnn", 1.0),
    ("CR", "cpu"): ("xr-cnn", 1.0),
    ("CR", "cuda"): ("xr-cnn", 1.0),
    ("DX", "cpu"): ("xr-cnn", 1.0),
    ("DX", "cuda"): ("xr-cnn", 1.0),
    ("XA", "cpu"): ("xr-cnn", 1.0),
    ("XA", "cuda"): ("xr-cnn", 1.0),
    # us-cnn 1.1 is still below the noisy input on a crop of the held-out NEMA US1 image at full strength, above
    # it at 0.5 (models/bundled/README.md): start at half strength.
    ("US", "cpu"): ("us-cnn", 0.5),
    ("US", "cuda"): ("us-cnn", 0.5),
    ("ES", "cpu"): ("endo-cnn", 1.0),
    ("ES", "cuda"): ("endo-cnn", 1.0),
    ("XC", "cpu"): ("endo-cnn", 1.0),
    ("XC", "cuda"): ("endo-cnn", 1.0),
}
#: Strength of a model named with ``--model`` and no ``--strength``, when it is not 1.
DEFAULT_STRENGTHS = {name: strength for name, strength in DEFAULT_MODELS.values()}


@dataclass
class ModelChoice:
    """The model folder and strength for one series, and why (printed, so the user knows what ran)."""

    folder: Path
    strength: float
    why: str


def choose_model(series: Any, cfg: Config, model: str | None, strength: float | None, device_type: str,
                 use_rules: bool) -> ModelChoice:
    """The model and strength for ``series``: as the node would pick them for this device.

    ``--model`` wins; else, with a configuration (``use_rules``), the first matching rule's model and strength;
    else the bundled default of :data:`DEFAULT_MODELS` for the modality and device type; else the first installed
    model whose card fits. An explicit ``strength`` always wins.

    Raises
    ------
    ModelNotFound
        When no model fits the series.
    """
    from dicom_node.denoise.engine import series_unit  # noqa: PLC0415 - delays torch (denoise.engine)
    from models.folder import ModelMismatch, ModelNotFound, find_model, list_models, read_card  # noqa: PLC0415 - delays torch (models.folder)

    directories = cfg.models.directories
    if model:
        folder = find_model(model, directories)
        chosen = strength if strength is not None else DEFAULT_STRENGTHS.get(read_card(folder).name, 1.0)
        return ModelChoice(folder, chosen, "--model")
    note = ""
    if use_rules:
        from dicom_node.assemble.routing import SeriesAttributes, route  # noqa: PLC0415 - CLI handler: --help stays light
        from dicom_node.receive.receiver import extract_facts  # noqa: PLC0415 - CLI handler: --help stays light

        try:
            facts = extract_facts(series.first, "", "", cfg.node.ae_title)
        except Exception as exc:  # a header the node would refuse: no rule applies, say so and go on
            note = f"no rule applies ({exc})"
        else:
            decision = route(cfg.rules, SeriesAttributes.from_row(facts))
            rule = decision.rule
            if rule is not None and rule.model:
                return ModelChoice(find_model(rule.model, directories),
                                   strength if strength is not None else rule.strength,
                                   f"rule {rule.name!r} of {cfg.source}")
            note = (f"rule {rule.name!r} of {cfg.source} names no model" if rule is not None
                    else f"{decision.note} in {cfg.source}")
    unit = series_unit(series)
    fitting = []
    for entry in list_models(directories):
        if entry.card is None:
            continue
        try:
            entry.card.check_fits(series.modality, unit)
        except ModelMismatch:
            continue
        fitting.append(entry)
    prefix = f"{note}; " if note else ""
    default = DEFAULT_MODELS.get((series.modality, device_type))
    if default is not None:
        for entry in fitting:
            if entry.card is not None and entry.card.name == default[0]:
                return ModelChoice(entry.path, strength if strength is not None else default[1],
                                   f"{prefix}the default for {series.modality} on {device_type}")
    if fitting:
        return ModelChoice(fitting[0].path, strength if strength is not None else 1.0,
                           f"{prefix}the first installed model for {series.modality}")
    raise ModelNotFound(f"no installed model fits {series.modality} series; pass --model NAME or a model folder "
                        "(see `dicom-node models list`)")


def run_denoise(args: argparse.Namespace) -> int:
    """Handler of ``dicom-node denoise``."""
    import torch  # noqa: PLC0415 - delays torch
    from tqdm import tqdm  # noqa: PLC0415 - delays tqdm

    from dicom_node.denoise.derived import DerivedSeriesSettings, new_series_uid  # noqa: PLC0415 - CLI handler: --help stays light
    from dicom_node.denoise.engine import Engine, denoise_series  # noqa: PLC0415 - delays torch (denoise.engine)
    from dicom_node.denoise.preview import preview_image, write_png  # noqa: PLC0415 - CLI handler: --help stays light
    from dicom_node.denoise.series import scan  # noqa: PLC0415 - CLI handler: --help stays light
    from models.folder import ModelError, load_model_folder, resolve_device  # noqa: PLC0415 - delays torch (models.folder)

    cfg = config_from_args(args)
    if args.strength is not None and not 0.0 <= args.strength <= 1.0:
        print(f"dicom-node denoise: --strength {args.strength} is outside [0, 1]", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if cfg.models.keep_freed_cpu_memory:
        keep_freed_memory()  # as `serve` does: the denoise threads start below
    if not args.input.exists():
        print(f"dicom-node denoise: {args.input} does not exist", file=sys.stderr)
        return 2
    try:
        device = resolve_device(args.device or cfg.models.device)
    except ModelError as exc:
        print(f"dicom-node denoise: {exc}", file=sys.stderr)
        return 2
    use_rules = cfg.source != "defaults"  # a configuration was given: pick as its rules do
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
                choice = choose_model(series, cfg, args.model, args.strength, device.type, use_rules)
                if choice.folder not in engines:
                    engines[choice.folder] = Engine(load_model_folder(choice.folder, device),
                                                    batch_size=args.batch_size)
                engine = engines[choice.folder]
                bar.write(f"{series.describe()}: model {engine.model.card.name} at strength {choice.strength:g} "
                          f"on {device} ({choice.why})")
                uid = new_series_uid()
                result = denoise_series(series, engine, args.output / uid, strength=choice.strength,
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
    from models.folder import list_models, model_search_path  # noqa: PLC0415 - delays torch (models.folder)

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


def _metric_lines(metrics: dict, baseline: str) -> list[str]:
    """One line per evaluated series: PSNR input -> model (gain, baseline), noise SD, edge ratio."""
    lines = []
    for name, row in metrics.items():
        if not isinstance(row, dict):
            continue
        parts = []
        if "input_psnr" in row and "model_psnr" in row:
            gain = row["model_psnr"] - row["input_psnr"]
            base = f"; {baseline} {row[f'{baseline}_psnr']:.2f}" if f"{baseline}_psnr" in row else ""
            parts.append(f"PSNR {row['input_psnr']:.2f} -> {row['model_psnr']:.2f} dB ({gain:+.2f}{base})")
        if "input_noise_sd_hu" in row and "model_noise_sd_hu" in row:
            parts.append(f"noise SD {row['input_noise_sd_hu']:.2f} -> {row['model_noise_sd_hu']:.2f} HU")
        if "model_edge_ratio" in row:
            parts.append(f"edge ratio {row['model_edge_ratio']:.4f}")
        if not parts:
            parts = [f"{k} {v}" for k, v in list(row.items())[:4]]
        lines.append(f"  {name}: " + ", ".join(parts))
    return lines


def run_models_show(args: argparse.Namespace) -> int:
    """Handler of ``dicom-node models show NAME``: a readable summary; ``--all`` the card, ``--json`` as JSON."""
    from models.folder import ModelError, find_model, read_card, sha256_file  # noqa: PLC0415 - delays torch (models.folder)
    from models.networks import build_network, describe  # noqa: PLC0415 - delays torch (models.networks)

    cfg = config_from_args(args)
    try:
        folder = find_model(args.name, cfg.models.directories)
        card = read_card(folder)
    except ModelError as exc:
        print(f"dicom-node models show: {exc}", file=sys.stderr)
        return 1
    stats = describe(build_network(card.architecture, **card.arguments))
    weights = folder / "weights.safetensors"
    ok = weights.is_file() and sha256_file(weights) == card.sha256
    if args.json:
        print(json.dumps({"folder": str(folder), "card": card.to_dict(), "parameters": stats["parameters"],
                          "gflop_per_slice": stats["gflop_per_slice"], "weights_match": ok}, indent=2, default=str))
        return 0 if ok else 1
    if args.all:
        print(f"# {folder}")
        print(card.to_toml(), end="")
        print(f"\n# parameters: {stats['parameters']:,}; {stats['gflop_per_slice']:.1f} GFLOP per 512x512 slice; "
              f"weights {'match' if ok else 'DO NOT MATCH'} the card's sha256")
        return 0 if ok else 1
    norm = card.normalization
    scaling = (f"offset {norm.offset:g}, scale {norm.scale:g}" + (f", clip {norm.clip}" if norm.clip else "")
               if norm.mode == "fixed" else f"percentiles {norm.percentiles}")
    low, high = card.strength_range or (0.0, 1.0)
    training = card.training
    data = ", ".join(training.get("train", [])) if isinstance(training.get("train"), list) else ""
    fields = {
        "model": f"{card.name} {card.version}" + (f" (created {card.created})" if card.created else ""),
        "folder": str(folder),
        "what": card.description or "-",
        "for": f"{', '.join(card.modalities)}; body parts {', '.join(card.body_parts) or 'any'}; "
               f"strength {low:g} to {high:g}",
        "network": f"{card.architecture}, {stats['parameters']:,} parameters, "
                   f"{stats['gflop_per_slice']:.1f} GFLOP per 512x512 slice",
        "input": f"{norm.input_unit}, {norm.mode} normalisation ({scaling})",
        "trained": ", ".join(str(v) for v in (training.get("mode"), training.get("pairs") and
                                              f"{training['pairs']} pairs",
                             training.get("steps") and f"{training['steps']} steps", data and f"on {data}") if v)
                   or "-",
        "retrain": str(training.get("command", "-")),
        "weights": f"sha256 {card.short_hash or '-'}: {'match the card' if ok else 'DO NOT MATCH the card'}",
    }
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        print(f"{key:<{width}}  {value}")
    metrics = card.metrics
    rows = _metric_lines(metrics, str(metrics.get("baseline", "")))
    if rows:
        context = ", ".join(f"{k} {metrics[k]}" for k in ("dose_fraction", "baseline", "window_hu") if k in metrics)
        print(f"measured ({context}):" if context else "measured:")
        print("\n".join(rows))
    print(f"(the whole card: dicom-node models show {args.name} --all, or --json)")
    return 0 if ok else 1
