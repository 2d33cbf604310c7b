"""Sweeps of DVC experiments executed on Ray, from a laptop (a local Ray instance) to a cluster (``RAY_ADDRESS``).

``python -m pipeline.sweep -S 'train.learning_rate=0.1,0.2'`` (``make sweep``) expands the
``-S`` arguments like ``dvc exp run --queue`` and runs every combination as one Ray task:
a DVC experiment in a fresh clone of the sweep's code, pushed back with ``dvc exp push``,
its MLflow runs tagged ``dvc.exp_name`` and ``pipeline.sweep``.

Modules: :mod:`.spec` (pure: expansion, names, checks, the comparison table),
:mod:`.workspace` (the code as a commit and ref, git and DVC remotes), :mod:`.worker`
(one task, shipped to the workers by value), :mod:`.supervise` (a worker's child-process
guard) and :mod:`.__main__` (the driver).
"""
