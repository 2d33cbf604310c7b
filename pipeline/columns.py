"""The names of the per-epoch columns the train stage writes (``history.csv``, MLflow metrics).

A module of its own so that the train stage depends on the names but not on :mod:`pipeline.history`,
which computes statistics from them downstream: changing a statistic must not retrain anything.
"""

from __future__ import annotations

import re

SCALARS = ("accuracy", "loss", "test_accuracy", "test_loss")
WEIGHT_CHANGE, GRAD, GRAD_BIAS = "weight_change", "grad", "grad_bias"
LAYER_KINDS = (WEIGHT_CHANGE, GRAD, GRAD_BIAS)
# Nielsen's "speed of learning" of a layer, used for ratios and the vanishing index.
SPEED = GRAD_BIAS
# Measured on the probe batch by ``callbacks.ActivationProbe`` (definitions: docs/science.md):
# per hidden layer and the output, activation mean and 2nd / 98th percentiles, saturated fraction,
# signal and gain; per hidden layer, the layer Jacobian's singular values; without a layer, the
# product of jac_mean over hidden layers 1 … L-1 (the predicted first / last speed ratio) and the
# output–label coupling and its share.
ACT_MEAN, ACT_P02, ACT_P98, SATURATION = "act_mean", "act_p02", "act_p98", "saturation"
SIGNAL, GAIN = "signal", "gain"
JAC_MEAN, JAC_MAX, JAC_PRODUCT = "jac_mean", "jac_max", "jac_product"
COUPLING, COUPLING_SHARE = "coupling", "coupling_share"
OUTPUT = "output"
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
