"""The names of the per-epoch columns the train stage writes (``history.csv``, MLflow metrics).

Its own module because the train stage depends on it (names are part of its outputs) while
:mod:`pipeline.history`, which computes statistics from those columns, is downstream:
changing a statistic must not retrain anything.
"""

from __future__ import annotations

import re

SCALARS = ("accuracy", "loss", "test_accuracy", "test_loss")
WEIGHT_CHANGE, GRAD, GRAD_BIAS = "weight_change", "grad", "grad_bias"
LAYER_KINDS = (WEIGHT_CHANGE, GRAD, GRAD_BIAS)
# Nielsen's "speed of learning" of a layer, used for ratios and the vanishing index.
SPEED = GRAD_BIAS
# Measured on the probe batch by ``callbacks.ActivationProbe`` (see ``measures``): activation
# mean and 2nd / 98th percentiles, saturated fraction, and the layer Jacobian's singular values.
ACT_MEAN, ACT_P02, ACT_P98, SATURATION = "act_mean", "act_p02", "act_p98", "saturation"
JAC_MEAN, JAC_MAX = "jac_mean", "jac_max"
# Signal propagation on the probe batch: each layer's across-example spread and its ratio to the
# spread it receives (per hidden layer and the output); the output–label cross-covariance's
# largest singular value and its share (one column each, no layer).
SIGNAL, GAIN = "signal", "gain"
COUPLING, COUPLING_SHARE = "coupling", "coupling_share"
OUTPUT = "output"
# Product of jac_mean over hidden layers 1 … L-1: the predicted first / last speed ratio.
JAC_PRODUCT = "jac_product"
_LAYER_COLUMN = re.compile(r"^(?P<kind>[a-z_0-9]+)/hidden_(?P<layer>\d+)$")


def layer_column(kind: str, layer: int) -> str:
    """``grad`` and 2 -> ``grad/hidden_2`` (layer 1 is next to the input)."""
    return f"{kind}/hidden_{layer}"


def output_column(kind: str) -> str:
    """``saturation`` -> ``saturation/output``: the output layer's value."""
    return f"{kind}/{OUTPUT}"


def probe_column(kind: str, layer: int | None) -> str:
    """:func:`layer_column` for hidden layer ``layer``, :func:`output_column` for None."""
    return output_column(kind) if layer is None else layer_column(kind, layer)


def parse_layer_column(column: str) -> tuple[str, int] | None:
    """``grad/hidden_2`` -> (``grad``, 2); None for any other column."""
    m = _LAYER_COLUMN.match(str(column))
    return (m["kind"], int(m["layer"])) if m else None
