"""Stage ``summarize``: one variant's ``metrics.json`` from its ``history.csv`` and the training labels.

:func:`pipeline.history.summarize` with the plateau of the training labels. A stage of its own, downstream
of training: changing ``summary`` in params.yaml retrains nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline import cli, history
from pipeline.outputs import write_text_atomic
from pipeline.params import SummaryParams

log = logging.getLogger("pipeline.summarize")


class SummaryError(RuntimeError):
    """The summary cannot be written; the message names the file and what to do."""


def read_plateau(path: Path) -> tuple[float, float]:
    """The plateau's accuracy and quadratic cost from the labels ``y`` of the preprocess stage's ``train.npz``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return history.plateau_accuracy(data["y"]), history.prior_mse(data["y"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise SummaryError(
            f"{path}: cannot read the training labels ({exc}); run the preprocess stage (dvc repro)"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=Path, required=True, help="the variant's history.csv")
    parser.add_argument("--train", type=Path, required=True, help="the training split (its labels define the plateau)")
    parser.add_argument("--out", type=Path, required=True, help="metrics.json to write")

    def body(args: argparse.Namespace, p: SummaryParams) -> None:
        table, (plateau, plateau_loss) = history.read_history(args.history), read_plateau(args.train)
        metrics = history.summarize(table, p, plateau)
        metrics["plateau_mse"] = plateau_loss  # the loss of an MSE net on the plateau
        try:
            write_text_atomic(args.out, json.dumps(metrics, indent=2) + "\n")
        except OSError as exc:
            raise SummaryError(
                f"cannot write {args.out}: {exc.strerror or exc}; free disk space or make its folder writable"
            ) from exc
        keys = ("vanishing_index", "escape_epoch", "escaped_fraction", "escape_forecast")
        log.info("%s: %s -> %s", args.history.parent.name, ", ".join(f"{k} {metrics[k]}" for k in keys), args.out)

    return cli.run_stage(parser, "summary", body, (SummaryError, history.HistoryError), argv)


if __name__ == "__main__":
    raise SystemExit(main())
