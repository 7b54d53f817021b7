"""The application layer: everything that wires the stages together (CLI, demo, predict and
encode orchestration, validators that decode, VAE check, bench). Nothing imports it; see
docs/architecture.md."""
