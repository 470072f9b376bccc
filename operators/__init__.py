"""Airflow operators, sensor and trigger: thin wrappers over :mod:`pipeline`."""
