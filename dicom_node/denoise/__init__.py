"""Denoising stage: the worker, inference engine and derived-series builder (imports torch; never used by receive).

Public API (import from the submodules; this package imports nothing on its own so that importing
``dicom_node.denoise.derived`` or ``.series`` does not pull in torch):

- :mod:`dicom_node.denoise.engine`: :class:`~dicom_node.denoise.engine.Engine` (a loaded model on a device,
  reused across jobs) and :func:`~dicom_node.denoise.engine.denoise_series` (one series in, derived files out,
  returns a :class:`~dicom_node.denoise.engine.DenoiseResult`); imports torch.
- :mod:`dicom_node.denoise.series`: :func:`~dicom_node.denoise.series.scan` (files -> sorted series),
  :func:`~dicom_node.denoise.series.read_frames` (decode one instance); pydicom only.
- :mod:`dicom_node.denoise.pixels`: stored <-> physical <-> network conversions; numpy only.
- :mod:`dicom_node.denoise.derived`: :func:`~dicom_node.denoise.derived.build_derived_instance`,
  :class:`~dicom_node.denoise.derived.DerivationInfo`, :func:`~dicom_node.denoise.derived.new_series_uid`,
  :func:`~dicom_node.denoise.series_writer.write_instance`,
  :class:`~dicom_node.denoise.series_writer.DerivedSeriesWriter`
  (a whole series, same bytes, less CPU); pydicom only.
- :mod:`dicom_node.denoise.errors`: :class:`~dicom_node.denoise.errors.SeriesRefused`.
- :mod:`dicom_node.denoise.worker`: :class:`~dicom_node.denoise.worker.Worker` (claims jobs, denoises, queues the
  exports).
- :mod:`dicom_node.denoise.model_check`: a configuration's rules checked against the installed models.
- :mod:`dicom_node.denoise.cpu_memory`: glibc allocator tuning for CPU inference.

Synthetic series and tiny model folders for tests are in ``tests/fixtures/images.py``.
"""
