"""Sweeps of DVC experiments run as Ray tasks (``python -m pipeline.sweep``, ``make sweep``); see the README."""
