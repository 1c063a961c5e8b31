"""Denoising networks, the model-folder format and its loader.

``models`` imports neither ``dicom_node`` nor ``training``.

- :mod:`models.networks`: ``build_network(architecture, **arguments)`` and the registry (``red-cnn``,
  ``unet-res``, ``unet-res-small``, ``gan-generator``, ``patch-critic``), ``count_flops``, ``count_parameters``.
- :mod:`models.folder`: ``ModelCard`` / ``Normalization`` (``card.toml``), ``save_model_folder``,
  ``load_model_folder`` (checks the sha256), ``find_model``, ``list_models``, ``load_model``.
- ``models/bundled/``: default model folders shipped with the package, produced by ``training/`` (empty until
  trained models exist; random weights are never shipped).
"""
