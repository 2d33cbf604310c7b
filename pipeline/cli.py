"""The shell every simple stage's ``main()`` shares: arguments, logging, the params check, one error line."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.params import ParamsError, check_file, load_section

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def run_stage(
    parser: argparse.ArgumentParser,
    section: str,
    body: Callable[[argparse.Namespace, Any], None],
    expected: tuple[type[Exception], ...],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv``, check the whole params file (a mistake anywhere stops the first stage that runs)
    and call ``body(args, <section's params>)``. An ``expected`` failure (bad params or data, a full disk)
    is one error line and exit status 1; anything else is a bug and keeps its traceback."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    parser.add_argument("--params", default="params.yaml", help=f"params file (reads its '{section}' section)")
    args = parser.parse_args(argv)
    try:
        check_file(args.params)
        body(args, load_section(section, args.params))
    except (ParamsError, *expected) as exc:
        logging.getLogger(f"pipeline.{section}").error("%s", exc)
        return 1
    return 0
