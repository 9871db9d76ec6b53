"""PixelOps stage logic: one module per stage, plain functions, no Prefect or DVC import."""
