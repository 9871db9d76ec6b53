"""Prefect wiring only: thin task wrappers around tasks/<stage>.run, and the pipeline flow."""
