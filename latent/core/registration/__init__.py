"""Registration of each case's CT onto its MR (``latent register``; docs/registration.md)."""
