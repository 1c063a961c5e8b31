"""Copy a run's model folder to ``models/bundled/<name>`` with the metrics ``evaluate`` measured in its card.

``python -m training.bundle RUN_MODEL_DIR EVALUATION_DIR [--command "..."]``: the weights are copied unchanged
(same sha256); the card gets ``[metrics]`` from ``EVALUATION_DIR/metrics.json`` and, when given, the exact
retraining command.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def bundle(model_dir: str, evaluation_dir: str, command: str | None = None, dest_root: str = "models/bundled") -> Path:
    from models.folder import load_model_folder, save_model_folder
    from training.evaluate import card_metrics

    loaded = load_model_folder(model_dir, "cpu")
    card = loaded.card
    metrics = json.loads((Path(evaluation_dir) / "metrics.json").read_text())
    if metrics.get("model") != card.name:
        raise ValueError(f"{evaluation_dir} scored {metrics.get('model')!r}, not {card.name!r}")
    card.metrics = card_metrics(metrics)
    if command:
        card.training["command"] = command
    dest = Path(dest_root) / card.name
    if dest.exists():
        shutil.rmtree(dest)
    save_model_folder(loaded.network, card, dest)
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bundle")
    p.add_argument("model")
    p.add_argument("evaluation")
    p.add_argument("--command", default=None)
    p.add_argument("--dest", default="models/bundled")
    a = p.parse_args(argv)
    print(bundle(a.model, a.evaluation, a.command, a.dest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
