"""Prefect flows composing the photref tasks."""
