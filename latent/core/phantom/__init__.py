"""The paired MR/CT phantom generator (SynthRAD2025 layout)."""
