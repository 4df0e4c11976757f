"""What the instrumentation measures.

A statistic is computed in two stages so that it can be aggregated over variables:

1. *quantities*: additive per-variable reductions, small pure functions of one variable's step
   (`VariableStep` -> scalar), e.g. the sum of squared gradient elements;
2. *statistics*: a `finalize` function of the summed quantities of a group (one variable, one
   layer, or the whole model), e.g. `grad_norm = sqrt(grad_sq)`.

Both are registries: `register_quantity` and `register_statistic` add new measures without
touching the instrumentation.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping

from keras import ops

EPSILON = 1e-12
"""Added to denominators of ratios (`effective_lr`, `update_ratio`)."""


@dataclasses.dataclass(frozen=True)
class VariableStep:
    """One model variable's step, as seen by a quantity function.

    `gradient`: the dense gradient the rule used (after clipping), float32 or float64;
    `old_value`, `new_value`: the variable before and after the step (`old_value` is None
    unless a selected statistic needs it); `slots`: the optimizer's slots after the step;
    `previous_gradient`: the previous step's gradient (None unless needed);
    `sign_reference`: the first-moment slot that `sign_agreement` compares signs with.
    Quantities reduce in float64.
    """

    gradient: object
    old_value: object
    new_value: object
    slots: Mapping[str, object]
    previous_gradient: object = None
    sign_reference: object = None


def _count(mask):
    return ops.sum(ops.cast(mask, "float64"))


def _sum_sq(x):
    # float64: a finite float32 element above ~1.8e19 would overflow when squared
    return ops.sum(ops.square(ops.cast(x, "float64")))


QUANTITIES: dict[str, Callable[[VariableStep], object]] = {
    "grad_sq": lambda s: _sum_sq(s.gradient),
    "update_sq": lambda s: _sum_sq(s.new_value - s.old_value),
    "weight_sq": lambda s: _sum_sq(s.new_value),
    "size": lambda s: float(math.prod(s.gradient.shape)),
    "zero_grads": lambda s: _count(ops.equal(s.gradient, 0)),
    "nonfinite_grads": lambda s: _count(ops.logical_not(ops.isfinite(s.gradient))),
    "flips": lambda s: _count(ops.less(s.gradient * s.previous_gradient, 0)),
    "agreements": lambda s: _count(ops.equal(ops.sign(s.gradient), ops.sign(s.sign_reference))),
}
"""Per-variable additive quantities by name. `slot_sq/<slot>` entries are made per slot."""

NEEDS_OLD_VALUE = {"update_sq"}
NEEDS_PREVIOUS_GRADIENT = {"flips"}
NEEDS_SIGN_REFERENCE = {"agreements"}


@dataclasses.dataclass(frozen=True)
class Statistic:
    """A statistic: `finalize(*quantities)` maps summed quantities (vectors over groups) to
    values. `cumulative` marks counts whose running total since the start is meaningful."""

    name: str
    quantities: tuple[str, ...]
    finalize: Callable[..., object]
    cumulative: bool = False
    doc: str = ""


def _ratio(numerator_sq, denominator_sq):
    return ops.sqrt(numerator_sq) / (ops.sqrt(denominator_sq) + EPSILON)


STATISTICS: dict[str, Statistic] = {}


def register_quantity(name, fn, *, needs_old_value=False):
    """Adds a per-variable quantity `fn(step: VariableStep) -> scalar` (additive over variables)."""
    QUANTITIES[name] = fn
    if needs_old_value:
        NEEDS_OLD_VALUE.add(name)


def register_statistic(statistic):
    """Adds a `Statistic`; its quantities must be registered already."""
    unknown = [q for q in statistic.quantities if q not in QUANTITIES]
    if unknown:
        raise ValueError(
            f"Statistic {statistic.name!r} uses unknown quantities {unknown}. "
            f"Known: {sorted(QUANTITIES)}"
        )
    STATISTICS[statistic.name] = statistic
    return statistic


for _statistic in (
    Statistic("grad_norm", ("grad_sq",), ops.sqrt, doc="||g||_2 of the gradient the rule used"),
    Statistic("update_norm", ("update_sq",), ops.sqrt, doc="||w_new - w_old||_2"),
    Statistic("weight_norm", ("weight_sq",), ops.sqrt, doc="||w_new||_2"),
    Statistic(
        "effective_lr",
        ("update_sq", "grad_sq"),
        _ratio,
        doc="update_norm / (grad_norm + eps): step taken per unit gradient",
    ),
    Statistic(
        "update_ratio",
        ("update_sq", "weight_sq"),
        _ratio,
        doc="update_norm / (weight_norm + eps)",
    ),
    Statistic(
        "zero_grad_fraction",
        ("zero_grads", "size"),
        lambda zeros, size: zeros / size,
        doc="fraction of gradient elements exactly 0 (dead ReLU units)",
    ),
    Statistic(
        "nonfinite_grad_count",
        ("nonfinite_grads",),
        lambda n: n,
        cumulative=True,
        doc="number of NaN/Inf gradient elements",
    ),
    Statistic(
        "sign_flip_fraction",
        ("flips", "size"),
        lambda flips, size: flips / size,
        doc="fraction of elements whose gradient changed sign since the previous step",
    ),
    Statistic(
        "sign_flip_count",
        ("flips",),
        lambda n: n,
        cumulative=True,
        doc="number of elements whose gradient changed sign (total: cumulative flips)",
    ),
    Statistic(
        "sign_agreement",
        ("agreements", "size"),
        lambda agree, size: agree / size,
        doc="fraction of elements where sign(g) == sign(m)",
    ),
):
    register_statistic(_statistic)

SLOT_NORM = "slot_norm"
"""`slot_norm` selects `slot_norm/<slot>` (= ||slot||_2) for every slot the optimizer keeps."""

DEFAULT_STATISTICS = ("grad_norm", "update_norm", "weight_norm", "effective_lr", "update_ratio")
"""Cheap statistics computed unless asked otherwise (plus the optimizer's natural ones). A
non-finite gradient already shows as a non-finite `grad_norm` (and its first step is kept);
`nonfinite_grad_count` counts the elements, at the cost of one more pass over each gradient."""

GLOBAL_STATISTICS = ("learning_rate", "global_grad_norm", "global_update_norm")


def slot_statistic(slot):
    """The `slot_norm/<slot>` statistic, made on demand for the slots found at build time."""
    quantity = f"slot_sq/{slot}"
    if quantity not in QUANTITIES:
        QUANTITIES[quantity] = lambda s: _sum_sq(s.slots[slot])
    return Statistic(f"{SLOT_NORM}/{slot}", (quantity,), ops.sqrt, doc=f"||{slot}||_2")
