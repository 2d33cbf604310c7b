"""Shared test setup: quiet TensorFlow, headless matplotlib, the project root."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")
# As pipeline.engine.configure_backend does: on a GPU, JAX would otherwise multiply float32
# in reduced precision (TF32), and the engine tests compare against float64 NumPy.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

ROOT = Path(__file__).resolve().parent.parent
