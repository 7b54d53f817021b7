"""Data quality review of a SynthRAD cohort (``latent qa``; docs/qa.md): per-case descriptors and
rules (:mod:`.case`), cohort MAD z-scores, an isolation forest and GREEN / YELLOW / RED labels
(:mod:`.cohort`), tables (:mod:`.tables`)."""
