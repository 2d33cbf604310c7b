"""Stage ``summarize``: one variant's ``metrics.json`` from its ``history.csv``.

``python -m pipeline.summarize --history results/<name>/history.csv --out results/<name>/metrics.json``

Final-epoch values (mean and std over seeds), the vanishing index and the escape epoch
(:func:`pipeline.history.summarize`). A stage of its own, downstream of training, so
that changing a summary setting (``summary`` in params.yaml) recomputes this file in a
second and retrains nothing. ``dvc metrics show`` and ``dvc exp show`` read it.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline import history
from pipeline.outputs import write_text_atomic
from pipeline.params import ParamsError, SummaryParams, check_file, load_section

log = logging.getLogger("pipeline.summarize")
REQUIRED_COLUMNS = ("seed", "epoch", *history.SCALARS)


class SummaryError(RuntimeError):
    """The history cannot be summarised; the message names the file and what to do."""


def read_history(path: Path) -> pd.DataFrame:
    """``history.csv`` with the columns a summary needs; SummaryError otherwise."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise SummaryError(f"{path}: cannot be read ({exc}); rerun its train stage (dvc repro)") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing or frame.empty or history.depth_of(frame) == 0:
        raise SummaryError(f"{path}: missing column(s) {missing or 'per layer'} or no rows; rerun its train stage")
    return frame


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m pipeline.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--history", type=Path, required=True, help="the variant's history.csv")
    parser.add_argument("--out", type=Path, required=True, help="metrics.json to write")
    args = parser.parse_args(argv)
    try:
        check_file(args.params)
        params: SummaryParams = load_section("summary", args.params)
        metrics = history.summarize(read_history(args.history), params.index_window, params.escape_margin)
        write_text_atomic(args.out, json.dumps(metrics, indent=2) + "\n")
    except (ParamsError, SummaryError) as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("cannot write %s: %s; free disk space or make its folder writable", args.out, exc.strerror or exc)
        return 1
    log.info(
        "%s: vanishing index %s, escape epoch %s (%s of the seeds escaped) -> %s",
        args.history.parent.name,
        metrics["vanishing_index"],
        metrics["escape_epoch"],
        metrics["escaped_fraction"],
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
