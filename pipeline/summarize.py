"""Stage ``summarize``: one variant's ``metrics.json`` from its ``history.csv``.

``python -m pipeline.summarize --history results/<name>/history.csv --out results/<name>/metrics.json``

Final-epoch values, the vanishing index and the escape epoch (:func:`pipeline.history.summarize`).
A stage of its own, downstream of training: changing ``summary`` in params.yaml retrains nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline import cli, history
from pipeline.outputs import write_text_atomic
from pipeline.params import SummaryParams

log = logging.getLogger("pipeline.summarize")


class SummaryError(RuntimeError):
    """The summary cannot be written; the message names the file and what to do."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.summarize", description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=Path, required=True, help="the variant's history.csv")
    parser.add_argument("--out", type=Path, required=True, help="metrics.json to write")

    def body(args: argparse.Namespace, params: SummaryParams) -> None:
        metrics = history.summarize(history.read_history(args.history), params.index_window, params.escape_margin)
        try:
            write_text_atomic(args.out, json.dumps(metrics, indent=2) + "\n")
        except OSError as exc:
            raise SummaryError(
                f"cannot write {args.out}: {exc.strerror or exc}; free disk space or make its folder writable"
            ) from exc
        log.info(
            "%s: vanishing index %s, escape epoch %s (fraction of seeds escaped %s) -> %s",
            args.history.parent.name,
            metrics["vanishing_index"],
            metrics["escape_epoch"],
            metrics["escaped_fraction"],
            args.out,
        )

    return cli.run_stage(parser, "summary", body, (SummaryError, history.HistoryError), argv)


if __name__ == "__main__":
    raise SystemExit(main())
