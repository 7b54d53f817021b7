"""Evaluation: the SynthRAD metrics, scoring a prediction folder, and dose."""
