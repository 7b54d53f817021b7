"""Shared core of the latent sCT pipeline: I/O, geometry, intensities, VAE, metrics, phantom, CLI."""
