"""PixelOps wiring shared by the CLI and the Prefect flows: stage registry and DVC's record."""
