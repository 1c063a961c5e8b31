"""Training recipes for the modalities other than CT: their images, noise simulation and classical baselines.

CT keeps its own path (:mod:`training.data`, :mod:`training.noise`): DICOM series, projection-domain noise. The
other modalities differ in where their images come from (DICOM, NIfTI/NRRD volumes, PNG/JPEG exports), how their
noise arises (Rician magnitude, detector Poisson-Gaussian, speckle, low-light colour sensor noise) and which
classical denoiser is the fair baseline, so each is one module here, chosen by the training config's
``[noise] kind``:

========================  =====================================
``[noise] kind``          module
========================  =====================================
``mr``                    :mod:`training.modalities.mr`
``xray``                  :mod:`training.modalities.xray`
``ultrasound``            :mod:`training.modalities.ultrasound`
``endoscopy``             :mod:`training.modalities.endoscopy`
========================  =====================================

Each module provides

``build_datasets(cfg, progress=True) -> (train, validation | None, summary)``
    datasets whose items are ``(noisy, clean)`` float32 tensors of shape ``(C_in, H, W)`` / ``(C_out, H, W)``
    (as :func:`training.loops.get_batch` stacks them), and a JSON-able summary for the model card;
``evaluate(model_dir, data, out_dir, *, seed, max_images, progress) -> dict``
    scores a model folder on held-out images against the noisy input and the modality's classical baselines,
    writing ``metrics.json``, ``table.md`` and figures into ``out_dir`` (what ``dicom-node evaluate`` runs for a
    model of that modality).

Modality-specific settings live in the config's free-form ``[recipe]`` table; the module validates its keys.
"""

from __future__ import annotations

import importlib
from types import ModuleType

RECIPES: dict[str, str] = {
    "mr": "training.modalities.mr",
    "xray": "training.modalities.xray",
    "ultrasound": "training.modalities.ultrasound",
    "endoscopy": "training.modalities.endoscopy",
}

# The card's first modality -> the recipe that evaluates models of that modality.
MODALITY_RECIPES: dict[str, str] = {
    "MR": "mr", "CR": "xray", "DX": "xray", "XA": "xray", "RF": "xray", "MG": "xray",
    "US": "ultrasound", "ES": "endoscopy", "OT": "endoscopy", "XC": "endoscopy",
}


def recipe_for(kind: str) -> ModuleType | None:
    """The recipe module for a ``[noise] kind``, or ``None`` for CT and the legacy kinds of :mod:`training.data`."""
    name = RECIPES.get(kind)
    return importlib.import_module(name) if name else None


def recipe_for_modality(modality: str) -> ModuleType | None:
    """The recipe module that evaluates a model whose card lists ``modality`` first (``None``: CT path)."""
    kind = MODALITY_RECIPES.get(modality.upper())
    return recipe_for(kind) if kind else None
