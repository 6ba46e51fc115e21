"""Prefect flows over the DVC stages (see tasks/ for the stages themselves)."""
