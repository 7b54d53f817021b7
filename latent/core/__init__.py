"""The core every stage stands on: cases, volumes, grids, intensities, the frozen VAE, the
training loop, the phantom. It imports no stage, no evaluation and not the application layer."""
