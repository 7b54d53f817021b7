"""The frozen VAE: sources and loading, tiled inference, and fitting the stand-in."""
