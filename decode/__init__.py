"""decode stage: model output -> HU -> native MR grid -> files a user or a TPS can read.

- :mod:`latent.decode.sct`: model output (CT latents or full-range CT) -> HU on the canonical grid.
- :mod:`latent.decode.native`: canonical grid -> exactly the native MR grid, air outside the body.
- :mod:`latent.decode.writers`: .mha / .nii.gz / DICOM dispatch and the prediction folder convention.
- :mod:`latent.decode.dicom`: DICOM CT series writer (atomic, correct geometry for oblique grids).
- :mod:`latent.decode.gc_io`: Grand Challenge (SynthRAD2025) container input/output layout.
"""
