"""Thin Prefect tasks over photref_core."""
