"""Per-variable statistics for any Keras optimizer, computed inside the compiled train step.

`Instrumented` is a mixin: `class InstrumentedAdam(Instrumented, keras.optimizers.Adam)`, or
`instrument(keras.optimizers.Adam)`. It leaves the update rule alone (like Optax's `snapshot`):
after the wrapped `_backend_update_step` it reduces each selected variable's step to a few
scalars (see `measures.py`), aggregates them per variable, layer or globally, and folds the
result into optimizer-owned non-trainable state that keeps, between two reads, the last value,
the sum (for the mean), the max, a running total and the first step at which each entry was
non-finite. `optimizer.statistics()` reads all of it in one transfer of that state. A reader
that schedules its reads (`schedule_reads`) has only the steps it reads measured, plus every step
with a non-finite gradient; the others then cost a finiteness check of the gradients.
"""

import collections
import dataclasses
import functools
import inspect
import math
import re
import sys

import keras
import numpy as np
from keras import ops

from optiscope.optimizers import measures
from optiscope.optimizers._common import dense_gradient, in_xla
from optiscope.optimizers._validation import check_hyperparameters

AGGREGATIONS = ("variable", "layer", "global")
_IGNORED_SLOTS = {"average", "gradient_accumulator"}  # base-class EMA and accumulation buffers
_OWN_PREFIX = "optiscope_"


@dataclasses.dataclass(frozen=True)
class Summary:
    """One statistic of one group between two reads.

    `mean` and `max` are NaN when no step ran since the previous read; `total` is the running
    sum since training began (meaningful for counts); `first_nonfinite_step` is the 1-based
    step at which the value was first NaN/Inf, or None.
    """

    last: float
    mean: float
    max: float
    total: float
    first_nonfinite_step: int | None


class Statistics:
    """What `Instrumented.statistics()` returns: a mapping `(statistic, group) -> Summary`.

    `group` is a variable path, a layer path or "global" depending on the aggregation; the
    per-step values `learning_rate`, `global_grad_norm` and `global_update_norm` have group None.
    `step` is the last measured optimizer step, `steps` the number of steps the window measured
    (every step, unless a reader scheduled its reads: see `Instrumented.schedule_reads`).
    """

    def __init__(self, step, steps, keys, last, mean, maximum, total, first_nonfinite):
        self.step = step
        self.steps = steps
        self._index = {key: i for i, key in enumerate(keys)}
        self._columns = (last, mean, maximum, total, first_nonfinite)

    def __getitem__(self, key):
        i = self._index[key]
        last, mean, maximum, total, first = (float(c[i]) for c in self._columns)
        return Summary(last, mean, maximum, total, None if first < 0 else int(first))

    def __contains__(self, key):
        return key in self._index

    def __iter__(self):
        return iter(self._index)

    def __len__(self):
        return len(self._index)

    def keys(self):
        return list(self._index)

    def items(self):
        return [(key, self[key]) for key in self._index]

    def scalars(self, field="mean"):
        """Flat `{"<statistic>/<group>": value}` of one field (`last`, `mean`, `max`, `total`)."""
        column = self._columns[("last", "mean", "max", "total").index(field)]
        return {
            name if group is None else f"{name}/{group}": float(column[i])
            for (name, group), i in self._index.items()
        }

    def first_nonfinite(self):
        """`(step, statistic, group)` of the earliest non-finite entry, or None."""
        first = self._columns[4]
        bad = [(int(first[i]), key) for key, i in self._index.items() if first[i] >= 0]
        if not bad:
            return None
        step, (name, group) = min(bad, key=lambda item: item[0])
        return step, name, group

    def __repr__(self):
        return f"Statistics(step={self.step}, steps={self.steps}, entries={len(self)})"


def _patterns(name, value):
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else list(value)
    compiled = []
    for pattern in values:
        if not isinstance(pattern, str):
            raise TypeError(
                f"Argument `{name}` must be a regular expression string or a list of them. "
                f"Received: {name}={value!r}"
            )
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(
                f"Argument `{name}` has an invalid regular expression {pattern!r}: {err}"
            ) from None
    return tuple(compiled)


@dataclasses.dataclass(eq=False)
class _Plan:
    """Plain (untracked) holder of the instrumentation's settings, layout and state."""

    statistics: tuple  # the requested statistic names, `default`/`all` expanded
    include: tuple  # compiled patterns
    exclude: tuple
    aggregation: str
    recorded_slots: dict | None = None  # variable key -> {slot: variable}, filled during build
    trace: dict = dataclasses.field(default_factory=dict)  # per-trace scratch (see train step)
    # Filled when the statistics are built:
    rows: dict = dataclasses.field(default_factory=dict)  # var index -> row in `selected`
    selected_variables: list = dataclasses.field(default_factory=list)
    paths: list = dataclasses.field(default_factory=list)  # their keys
    selected_slots: list = dataclasses.field(default_factory=list)  # per row: {slot: variable}
    own_previous: dict = dataclasses.field(default_factory=dict)  # var index -> own slot
    statistic_list: list = dataclasses.field(default_factory=list)  # `measures.Statistic`s
    quantities: list = dataclasses.field(default_factory=list)  # names, in column order
    global_names: list = dataclasses.field(default_factory=list)
    membership: np.ndarray | None = None  # groups x variables, None for per-variable groups
    keys: list = dataclasses.field(default_factory=list)  # (statistic, group) per entry
    needs_old: bool = False
    needs_previous: bool = False
    needs_sign: bool = False
    layout: "_Layout | None" = None
    state: object = None  # the state variable (see `_Layout`)
    marks: object = None  # the readers' marks variable
    schedule: object = None  # which steps are measured (see `schedule_reads`)
    readers: dict = dataclasses.field(default_factory=dict)  # reader id -> its schedule
    step_values: object = None  # compiled `_step_state`


class Instrumented:
    """Mixin giving any Keras optimizer per-variable statistics computed in the train step.

    Args (in addition to the optimizer's own):
        statistics: which statistics to compute: `"default"` (cheap ones plus this optimizer's
            natural ones), `"all"`, a list of names from `measures.STATISTICS` and/or
            `"slot_norm"`, `"slot_norm/<slot>"`, `"default"`, `"all"`; or None to compute
            nothing (the optimizer then runs exactly as the uninstrumented one).
            Defaults to `"default"`.
        include: regular expression(s); only variables whose path matches one are measured.
            Defaults to None (all).
        exclude: regular expression(s); variables whose path matches one are skipped.
            Defaults to None.
        aggregation: `"variable"`, `"layer"` or `"global"`: the groups statistics are
            reported for. Defaults to `"variable"`.
    """

    _previous_gradient_slot = None  # a slot that already holds the previous gradient
    _sign_reference_slot = None  # the first-moment slot `sign_agreement` compares with
    _natural_statistics = ()  # added to the defaults for this optimizer
    _keras_builtin = None  # the Keras optimizer class whose hyperparameters are checked

    def __init__(
        self,
        *args,
        statistics="default",
        include=None,
        exclude=None,
        aggregation="variable",
        **kwargs,
    ):
        if self._keras_builtin is not None:
            check_hyperparameters(_arguments(self._keras_builtin, args, kwargs))
        super().__init__(*args, **kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(
                f"Argument `aggregation` must be one of {AGGREGATIONS}. "
                f"Received: aggregation={aggregation!r}"
            )
        self._optiscope = _Plan(
            statistics=self._validate_statistics(statistics),
            include=_patterns("include", include),
            exclude=_patterns("exclude", exclude),
            aggregation=aggregation,
        )
        self._optiscope_config = {
            "statistics": statistics
            if statistics is None or isinstance(statistics, str)
            else list(statistics),
            "include": include if include is None or isinstance(include, str) else list(include),
            "exclude": exclude if exclude is None or isinstance(exclude, str) else list(exclude),
            "aggregation": aggregation,
        }

    # ----------------------------------------------------------------- configuration
    def _available_statistics(self):
        names = [n for n in measures.STATISTICS if n != "sign_agreement"]
        if self._sign_reference_slot is not None:
            names.append("sign_agreement")
        return names + [measures.SLOT_NORM]

    def _validate_statistics(self, statistics):
        """Returns the requested names in order, with `default`/`all` expanded."""
        if statistics is None:
            return ()
        requested = [statistics] if isinstance(statistics, str) else list(statistics)
        available = self._available_statistics()
        names = []
        for name in requested:
            if name == "default":
                expanded = [*measures.DEFAULT_STATISTICS, *self._natural_statistics]
            elif name == "all":
                expanded = available
            elif not isinstance(name, str):
                raise TypeError(
                    "Argument `statistics` must be a name or a list of names. "
                    f"Received: statistics={statistics!r}"
                )
            elif name in available or name.startswith(measures.SLOT_NORM + "/"):
                expanded = [name]
            else:
                raise ValueError(
                    f"Argument `statistics` has unknown statistic {name!r} for "
                    f"{type(self).__name__}. Allowed: 'default', 'all', "
                    f"{', '.join(repr(n) for n in available)}, 'slot_norm/<slot>'. "
                    f"Received: statistics={statistics!r}"
                )
            names += [n for n in expanded if n not in names]
        return tuple(names)

    def get_config(self):
        config = super().get_config()
        config.update(self._optiscope_config)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # The base class deserialises the learning rate in place: work on a copy.
        return super().from_config(dict(config), custom_objects=custom_objects)

    # ----------------------------------------------------------------- build
    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        variable = super().add_variable_from_reference(
            reference_variable, name=name, initializer=initializer
        )
        recorded = self._optiscope.recorded_slots
        if recorded is not None and name not in _IGNORED_SLOTS:
            recorded.setdefault(self._var_key(reference_variable), {})[name or "var"] = variable
        return variable

    def __init_subclass__(cls, **kwargs):
        # A subclass's own `build` creates its slots after `super().build()` returns, so the
        # statistics are laid out when the outermost `build` of the chain finishes.
        super().__init_subclass__(**kwargs)
        build = cls.__dict__.get("build")
        if build is not None and not getattr(build, "_optiscope_outer", False):

            @functools.wraps(build)
            def outer_build(self, var_list):
                return self._build_outermost(build, var_list)

            outer_build._optiscope_outer = True
            cls.build = outer_build

    def build(self, var_list):
        return self._build_outermost(super(Instrumented, type(self)).build, var_list)

    def _build_outermost(self, build, var_list):
        plan = self._optiscope
        if plan.recorded_slots is not None or self.built:
            return build(self, var_list)
        plan.recorded_slots = {}
        try:
            build(self, var_list)
        finally:
            recorded, plan.recorded_slots = plan.recorded_slots, None
        if plan.statistics:
            self._build_statistics(var_list, recorded)

    def _build_statistics(self, var_list, recorded_slots):
        plan = self._optiscope
        all_paths = variable_keys(var_list)
        selected, paths = [], []
        for index, (variable, path) in enumerate(zip(var_list, all_paths, strict=True)):
            if plan.include and not any(p.search(path) for p in plan.include):
                continue
            if any(p.search(path) for p in plan.exclude):
                continue
            if getattr(variable, "overwrite_with_gradient", False):
                continue
            selected.append((index, variable))
            paths.append(path)
        if not selected:
            raise ValueError(
                f"Arguments `include`/`exclude` select no variable to measure. Variable paths: "
                f"{all_paths}"
            )
        slots = {index: recorded_slots.get(self._var_key(v), {}) for index, v in selected}
        slot_names = list(dict.fromkeys(name for s in slots.values() for name in s))

        statistics = []
        for name in plan.statistics:
            if name == measures.SLOT_NORM:
                statistics += [measures.slot_statistic(s) for s in slot_names]
            elif name.startswith(measures.SLOT_NORM + "/"):
                slot = name.split("/", 1)[1]
                if slot not in slot_names:
                    raise ValueError(
                        f"Argument `statistics` asks for {name!r}, but {type(self).__name__} "
                        f"keeps the slots {slot_names}."
                    )
                statistics.append(measures.slot_statistic(slot))
            else:
                statistics.append(measures.STATISTICS[name])
        quantities = list(dict.fromkeys(q for s in statistics for q in s.quantities))
        if "grad_sq" not in quantities:
            quantities.append("grad_sq")  # for global_grad_norm

        own_previous = {}
        if set(quantities) & measures.NEEDS_PREVIOUS_GRADIENT and not self._previous_gradient_slot:
            for index, variable in selected:
                own_previous[index] = self.add_variable_from_reference(
                    variable, _OWN_PREFIX + "previous_gradient"
                )

        if plan.aggregation == "variable":
            groups, membership = paths, None
        else:
            keys = (
                [p.rsplit("/", 1)[0] if "/" in p else p for p in paths]
                if plan.aggregation == "layer"
                else ["global"] * len(paths)
            )
            groups = list(dict.fromkeys(keys))
            membership = np.zeros((len(groups), len(paths)), "float64")
            for column, key in enumerate(keys):
                membership[groups.index(key), column] = 1.0

        global_names = ["learning_rate", "global_grad_norm"]
        if "update_sq" in quantities:
            global_names.append("global_update_norm")
        keys = [(s.name, g) for s in statistics for g in groups] + [(n, None) for n in global_names]
        layout = _Layout(len(keys))

        plan.rows = {index: row for row, (index, _) in enumerate(selected)}
        plan.selected_variables = [v for _, v in selected]
        plan.paths = paths
        plan.selected_slots = [slots[index] for index, _ in selected]
        plan.own_previous = own_previous
        plan.statistic_list = statistics
        plan.quantities = quantities
        plan.global_names = global_names
        plan.membership = membership
        plan.keys = keys
        plan.needs_old = bool(set(quantities) & measures.NEEDS_OLD_VALUE)
        plan.needs_previous = bool(set(quantities) & measures.NEEDS_PREVIOUS_GRADIENT)
        plan.needs_sign = bool(set(quantities) & measures.NEEDS_SIGN_REFERENCE)
        plan.layout = layout
        plan.step_values = _xla_compiled(self._step_state)
        plan.state = self.add_variable(
            shape=(layout.state_size,),
            initializer=keras.initializers.Constant(layout.initial_state()),
            dtype="float64",
            aggregation="only_first_replica",
            name=_OWN_PREFIX + "statistics",
        )
        plan.marks = self.add_variable(
            shape=(layout.marks_size,),
            initializer="zeros",
            dtype="float64",
            aggregation="only_first_replica",
            name=_OWN_PREFIX + "read_marks",
        )
        plan.schedule = self.add_variable(
            shape=(len(_SCHEDULE_FIELDS._fields),),
            initializer=keras.initializers.Constant(self._schedule_vector()),
            dtype="float64",
            aggregation="only_first_replica",
            name=_OWN_PREFIX + "read_schedule",
        )

    @property
    def statistic_keys(self):
        """The `(statistic, group)` keys that `statistics()` reports, once built."""
        state = self._optiscope.state
        return list(self._optiscope.keys) if state is not None else []

    # ----------------------------------------------------------------- train step
    def _active(self):
        return self._optiscope.state is not None

    def _clip_gradients(self, grads):
        grads = super()._clip_gradients(grads)
        if self._active():
            self._optiscope.trace["measured"] = self._measured_step(grads)
        return grads

    def _measured_step(self, grads):
        """Whether this step is measured: always when no reader has scheduled its reads (or
        under a `tf.distribute` strategy), else on the scheduled steps and on every step with
        a non-finite gradient. A boolean tensor, or None for "always"."""
        if _has_strategy():
            return None
        schedule = _SCHEDULE_FIELDS(*ops.unstack(_read(self._optiscope.schedule)))
        step = ops.cast(self.iterations + 1, "float64")

        def due(period, origin):
            remainder = ops.mod(step - origin, ops.maximum(period, 1.0))
            return ops.logical_and(ops.greater(period, 0.0), ops.equal(remainder, 0.0))

        def nonfinite_gradient():
            sums = [ops.sum(ops.cast(_values(g), "float32")) for g in grads if g is not None]
            return ops.logical_not(ops.isfinite(ops.sum(ops.stack(sums))))

        return ops.logical_or(
            ops.logical_or(ops.equal(schedule.scheduled, 0.0), due(schedule.every, 0.0)),
            ops.logical_or(
                due(schedule.epoch_steps, schedule.origin),
                _cond(ops.equal(schedule.scheduled, 0.0), lambda: False, nonfinite_gradient),
            ),
        )

    def _apply_weight_decay(self, variables):
        plan = self._optiscope
        if self._active() and plan.needs_old and self.weight_decay is not None:
            plan.trace["pre_decay"] = self._read_selected(variables, plan.trace.get("measured"))
        super()._apply_weight_decay(variables)

    def _all_reduce_sum_gradients(self, grads_and_vars):
        reduced = super()._all_reduce_sum_gradients(grads_and_vars)
        if self._active():
            plan = self._optiscope
            plan.trace["reduced"] = {
                self._get_variable_index(v): g for g, v in reduced if g is not None
            }
        return reduced

    def _read_selected(self, variables, measured=None):
        """The measured variables' current values by index; on TensorFlow only on a measured
        step (a read kept across the update costs a copy of the variable)."""
        rows = self._optiscope.rows
        selected = {}
        for variable in variables:
            index = self._get_variable_index(variable)
            if index in rows:
                selected[index] = variable
        if measured is None or keras.backend.backend() != "tensorflow" or in_xla():
            return {index: _read(v) for index, v in selected.items()}  # no copy under XLA
        import tensorflow as tf

        values = _cond(
            measured,
            lambda: [_read(v) for v in selected.values()],
            lambda: [tf.zeros((0,), v.dtype) for v in selected.values()],
        )
        return dict(zip(selected, values, strict=True))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        if not self._active():
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        plan = self._optiscope
        trace = plan.trace
        measured = trace.pop("measured", None)
        old_values = trace.pop("pre_decay", None)
        if plan.needs_old and old_values is None:
            old_values = self._read_selected(trainable_variables, measured)
        previous = {}
        if plan.needs_previous:
            for variable in trainable_variables:
                index = self._get_variable_index(variable)
                if index in plan.rows:
                    source = plan.own_previous.get(index)
                    if source is None:
                        source = plan.selected_slots[plan.rows[index]][self._previous_gradient_slot]
                    previous[index] = _read(source)

        super()._backend_update_step(grads, trainable_variables, learning_rate)

        reduced = trace.pop("reduced", {})
        gradients = {
            self._get_variable_index(v): g
            for g, v in zip(grads, trainable_variables, strict=True)
            if g is not None
        }
        inputs = []
        for variable in plan.selected_variables:
            index = self._get_variable_index(variable)
            if index not in gradients:
                inputs.append((None, None, None))
                continue
            gradient = dense_gradient(
                reduced.get(index, gradients[index]), _compute_dtype(variable.dtype)
            )
            old = old_values[index] if plan.needs_old else None
            inputs.append((gradient, old, previous.get(index)))
        self._measure(inputs, learning_rate, measured)

    def _measure(self, inputs, learning_rate, measured):
        """Quantities of every measured variable, then the fold into the state (on a measured
        step; the previous gradients are kept on every step)."""
        plan = self._optiscope
        for variable, (gradient, _, _) in zip(plan.selected_variables, inputs, strict=True):
            own = plan.own_previous.get(self._get_variable_index(variable))
            if own is not None and gradient is not None:
                self.assign(own, gradient)
        learning_rate = ops.cast(learning_rate, "float64")
        step = ops.cast(self.iterations + 1, "float64")
        if measured is None:
            new_state = plan.step_values(inputs, learning_rate, step)
        elif _concrete(measured):  # an eager step: a plain branch (JAX's eager cond can crash)
            if bool(ops.convert_to_numpy(measured)):
                new_state = plan.step_values(inputs, learning_rate, step)
            else:
                new_state = _read(plan.state)
        else:
            new_state = _cond(
                measured,
                lambda: plan.step_values(inputs, learning_rate, step),
                lambda: _read(plan.state),
            )
        self.assign(plan.state, new_state)

    def _step_state(self, inputs, learning_rate, step):
        """The state after one step. On TensorFlow one XLA computation, which also reads the
        variables, slots and state after the update (only those a statistic uses)."""
        plan = self._optiscope
        rows = []
        for row, (gradient, old, previous) in enumerate(inputs):
            new = _read(plan.selected_variables[row])
            if gradient is None:  # no gradient this step: measured as a zero gradient
                old = new
            slots = {name: _read(slot) for name, slot in plan.selected_slots[row].items()}
            rows.append(self._quantities(gradient, old, new, slots, previous))
        values = self._finalize(ops.stack(rows), learning_rate)
        requested = plan.layout.marks(_read(plan.marks)).requested
        return self._fold(values, _read(plan.state), requested, step)

    def _quantities(self, gradient, old_value, new_value, slots, previous_gradient):
        """The quantities of one variable's step, as a float64 vector."""
        plan = self._optiscope
        dtype = _compute_dtype(new_value.dtype)
        if gradient is None:
            gradient = ops.zeros_like(new_value)
            previous_gradient = gradient if plan.needs_previous else None

        def cast(x, needed=True):
            return ops.cast(x, dtype) if needed else None

        variable_step = measures.VariableStep(
            gradient=cast(gradient),
            old_value=cast(old_value, plan.needs_old),
            new_value=cast(new_value),
            slots={name: cast(slot) for name, slot in slots.items()},
            previous_gradient=cast(previous_gradient, plan.needs_previous),
            sign_reference=(cast(slots[self._sign_reference_slot]) if plan.needs_sign else None),
        )
        return ops.stack(
            [ops.cast(measures.QUANTITIES[q](variable_step), "float64") for q in plan.quantities]
        )

    def _finalize(self, per_variable, learning_rate):
        """The statistics of one step, in the order of `keys`, from the per-variable rows."""
        plan = self._optiscope
        grouped = (
            per_variable
            if plan.membership is None
            else ops.matmul(ops.convert_to_tensor(plan.membership), per_variable)
        )
        columns = {q: grouped[:, i] for i, q in enumerate(plan.quantities)}
        parts = [s.finalize(*(columns[q] for q in s.quantities)) for s in plan.statistic_list]
        totals = ops.sum(per_variable, axis=0)
        global_values = {
            "learning_rate": learning_rate,
            "global_grad_norm": ops.sqrt(totals[plan.quantities.index("grad_sq")]),
        }
        if "global_update_norm" in plan.global_names:
            global_values["global_update_norm"] = ops.sqrt(
                totals[plan.quantities.index("update_sq")]
            )
        parts.append(ops.stack([global_values[n] for n in plan.global_names]))
        return ops.cast(ops.concatenate(parts), "float64")

    def _fold(self, values, state, requested, step):
        """One step's values folded into the state vector (see `_Layout`)."""
        layout = self._optiscope.layout
        old = layout.state(state)
        finite = ops.isfinite(values)
        never_bad = ops.less(old.first_nonfinite, 0.0)
        return layout.pack_state(
            last=values,
            total=old.total + ops.where(finite, values, ops.zeros_like(values)),
            maximum=ops.where(
                ops.greater(requested, old.window), values, ops.maximum(old.maximum, values)
            ),
            first_nonfinite=ops.where(
                ops.logical_and(never_bad, ops.logical_not(finite)), step, old.first_nonfinite
            ),
            nonfinite=old.nonfinite + ops.cast(ops.logical_not(finite), "float64"),
            count=old.count + 1.0,
            window=ops.maximum(old.window, requested),
            step=step,
        )

    # ----------------------------------------------------------------- read schedules
    def schedule_reads(self, reader, every=None, epoch_steps=None, start=0):
        """Measures only the steps `reader` will read, until `cancel_reads(reader)`.

        Until a reader schedules its reads, every step is measured, so a window's mean, max and
        totals cover all its steps. Once one has, a step is measured when it is a multiple of
        `every`, or ends an epoch of `epoch_steps` steps counted from optimizer step `start`,
        or has a non-finite gradient (so the first non-finite gradient's step and variable are
        still kept exactly); the others only check their gradients' sum for NaN/Inf. Windows
        then cover their measured steps (`Statistics.steps`). With several readers, a step is
        measured when any of them reads it. Each measured value is exact either way.

        Args:
            reader: any object; one schedule per reader.
            every: read every this many steps, or None.
            epoch_steps: steps per epoch (reads at each epoch's end), or None.
            start: the optimizer step the epochs count from. Defaults to 0.
        """
        for name, value in (("every", every), ("epoch_steps", epoch_steps)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(
                    f"Argument `{name}` must be a positive integer or None. "
                    f"Received: {name}={value!r}"
                )
        plan = self._optiscope
        plan.readers[id(reader)] = (every, epoch_steps, start)
        self._write_schedule()

    def cancel_reads(self, reader):
        """Withdraws `reader`'s schedule; with none left, every step is measured again."""
        self._optiscope.readers.pop(id(reader), None)
        self._write_schedule()

    def _write_schedule(self):
        plan = self._optiscope
        if plan.schedule is not None:  # else written when the optimizer is built
            self.assign(plan.schedule, self._schedule_vector())

    def _schedule_vector(self):
        schedules = list(self._optiscope.readers.values())
        periods = [every for every, _, _ in schedules if every]
        epochs = [(steps, start) for _, steps, start in schedules if steps]
        epoch_steps, origin = epochs[-1] if epochs else (0, 0)
        every = math.gcd(*periods) if periods else 0
        return np.array(_SCHEDULE_FIELDS(bool(schedules), every, epoch_steps, origin), "float64")

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self._write_schedule()  # the readers of this optimizer, not of the saved one

    # ----------------------------------------------------------------- reading
    def slot_values(self):
        """`{(slot, variable key): NumPy array}` for the measured variables (e.g. histograms)."""
        plan = self._optiscope
        if plan.state is None:
            return {}
        return {
            (slot, path): ops.convert_to_numpy(variable)
            for path, slots in zip(plan.paths, plan.selected_slots, strict=True)
            for slot, variable in slots.items()
        }

    def statistics(self, reset=True):
        """Reads every statistic: one transfer of the state, which the train step writes whole.

        Args:
            reset: start a new window after reading, so that the next read's mean and max
                cover only the steps in between. Defaults to True. Reads are consistent even
                from another thread while training runs (each sees whole steps); with more
                than one reader, the max window restarts at any reader's reset.

        Returns:
            A `Statistics` mapping `(statistic, group) -> Summary`.
        """
        plan = self._optiscope
        if not plan.statistics:
            raise ValueError(
                f"{type(self).__name__} was created with statistics=None: nothing is measured."
            )
        if plan.state is None:
            raise RuntimeError(
                "The optimizer is not built yet: statistics exist once it has been built "
                "(by `model.fit`, `optimizer.build(variables)` or a first `apply`)."
            )
        layout = plan.layout
        state = layout.state(_fetch(plan.state))  # one whole step: the train step's one write
        marks = layout.marks(_fetch(plan.marks))
        if reset:  # move the marks to now; the next measured step starts a new max window
            _store(
                plan.marks,
                layout.pack_marks(
                    np,
                    total=state.total,
                    nonfinite=state.nonfinite,
                    count=state.count,
                    requested=state.window + 1.0,
                ),
            )
        steps = int(state.count - marks.count)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (state.total - marks.total) / steps if steps else np.full(layout.size, np.nan)
        mean = np.where(state.nonfinite > marks.nonfinite, np.nan, mean)
        maximum = state.maximum
        if steps == 0 or marks.requested > state.window:
            maximum = np.full(layout.size, np.nan)
        return Statistics(
            int(state.step),
            steps,
            plan.keys,
            state.last,
            mean,
            maximum,
            state.total,
            state.first_nonfinite,
        )


class _Layout:
    """Where each field lives in the state and marks vectors of `size` statistic entries.

    The state is one float64 vector written only by the train step, so that a read sees one
    whole step (also when a callback reads from another thread): per entry `last`, `total` (sum
    of the finite values), `maximum` (of the current window), `first_nonfinite` (step, -1 for
    none) and `nonfinite` (number of non-finite values); then `count` (steps), `window` (the
    current max window) and `step` (of the last update). The marks, written only by readers,
    keep `total`, `nonfinite` and `count` at the last read, and the window the reader
    `requested`. Means are differences of totals, so they are exact.
    """

    State = collections.namedtuple(
        "State", "last total maximum first_nonfinite nonfinite count window step"
    )
    Marks = collections.namedtuple("Marks", "total nonfinite count requested")
    _STATE_ROWS, _MARK_ROWS = 5, 2  # per-entry fields; the others are scalars

    def __init__(self, size):
        self.size = size
        self.state_size = self._STATE_ROWS * size + len(self.State._fields) - self._STATE_ROWS
        self.marks_size = self._MARK_ROWS * size + len(self.Marks._fields) - self._MARK_ROWS

    def _split(self, flat, fields, rows):
        n = self.size
        values = [flat[r * n : (r + 1) * n] for r in range(rows)]
        return values + [flat[rows * n + i] for i in range(len(fields) - rows)]

    def state(self, flat):
        """The state vector (a tensor or NumPy array) as named fields."""
        return self.State(*self._split(flat, self.State._fields, self._STATE_ROWS))

    def marks(self, flat):
        return self.Marks(*self._split(flat, self.Marks._fields, self._MARK_ROWS))

    def _pack(self, fields, rows, xp):
        return xp.concatenate([*fields[:rows], xp.stack(fields[rows:])])

    def pack_state(self, xp=ops, **fields):
        return self._pack(self.State(**fields), self._STATE_ROWS, xp)

    def pack_marks(self, xp=ops, **fields):
        return self._pack(self.Marks(**fields), self._MARK_ROWS, xp)

    def initial_state(self):
        zeros = np.zeros(self.size)
        return self.pack_state(
            np,
            last=zeros,
            total=zeros,
            maximum=np.full(self.size, -np.inf),
            first_nonfinite=np.full(self.size, -1.0),
            nonfinite=zeros,
            count=0.0,
            window=0.0,
            step=0.0,
        )


_SCHEDULE_FIELDS = collections.namedtuple("Schedule", "scheduled every epoch_steps origin")


def _values(gradient):
    """A gradient's values (those of a sparse `IndexedSlices` gradient)."""
    return gradient.values if hasattr(gradient, "indices") else gradient


def _has_strategy():
    tf = sys.modules.get("tensorflow")
    return (
        keras.backend.backend() == "tensorflow" and tf is not None and tf.distribute.has_strategy()
    )


def _concrete(tensor):
    """True for a value known now (eager), False inside a traced function."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return not isinstance(tensor, jax.core.Tracer)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    return False


def _cond(pred, true_fn, false_fn):
    """`ops.cond`; on TensorFlow one `If` op in the graph, not lowered to a Switch and a Merge
    for each tensor that enters or leaves it (some 600 graph nodes a step on a model with 102
    variables, BENCHMARKS.md)."""
    result = ops.cond(pred, true_fn, false_fn)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        from tensorflow.python.ops import control_flow_util_v2

        if not tf.executing_eagerly():
            for tensor in tf.nest.flatten(result):
                op = tensor.op.inputs[0].op if tensor.op.type == "Identity" else tensor.op
                if op.type in ("If", "StatelessIf"):
                    control_flow_util_v2.maybe_set_lowering_attr(op, lower_using_switch_merge=False)
    return result


def _xla_compiled(fn):
    """`fn` as one XLA computation on TensorFlow, else as it is (the JAX backend compiles the
    whole train step anyway)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def _fetch(variable):
    """The variable's value as a NumPy array: on TensorFlow one read op (of a plain resource
    variable), a fraction of what a `tf.function` call costs."""
    value = _plain_tf_variable(variable)
    if value is None:
        return ops.convert_to_numpy(variable)
    import tensorflow as tf

    return tf.raw_ops.ReadVariableOp(resource=value.handle, dtype=value.dtype).numpy()


def _store(variable, array):
    """Writes a NumPy array into the variable (one assign op on TensorFlow, see `_fetch`)."""
    value = _plain_tf_variable(variable)
    if value is None:
        variable.assign(array)
        return
    import tensorflow as tf

    tf.raw_ops.AssignVariableOp(resource=value.handle, value=tf.constant(array, value.dtype))


def _plain_tf_variable(variable):
    """The TensorFlow resource variable behind a Keras variable, or None (other backends, and
    `tf.distribute` variables, which are read and written through Keras)."""
    if keras.backend.backend() != "tensorflow":
        return None
    from tensorflow.python.ops import resource_variable_ops

    value = variable.value
    return value if isinstance(value, resource_variable_ops.BaseResourceVariable) else None


def _read(variable):
    """The variable's current value (a Keras variable converts to itself on TensorFlow)."""
    return ops.copy(variable)


def variable_keys(variables):
    """The keys statistics use for variables: their paths, made unique, without a first
    component that all of them share when every path has at least three components (the
    scope of a Sequential model, which Keras drops when the model is reloaded)."""
    parts = [_path(v).split("/") for v in variables]
    if parts and all(len(p) >= 3 and p[0] == parts[0][0] for p in parts):
        parts = [p[1:] for p in parts]
    return _unique(["/".join(p) for p in parts])


def _path(variable):
    path = getattr(variable, "path", None)  # Keras variables; plain tf.Variables have names
    return path if path is not None else variable.name.split(":")[0]


def _unique(paths):
    seen = {}
    unique = []
    for path in paths:
        seen[path] = seen.get(path, 0) + 1
        unique.append(path if seen[path] == 1 else f"{path}#{seen[path] - 1}")
    return unique


def _compute_dtype(dtype):
    return "float64" if str(dtype) == "float64" else "float32"


def _arguments(optimizer_class, args, kwargs):
    """The constructor arguments by name (empty where they do not fit: Keras will say so)."""
    try:
        bound = inspect.signature(optimizer_class.__init__).bind_partial(None, *args, **kwargs)
    except TypeError:
        return {}
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", {}))
    return arguments


def unwrap(optimizer):
    """The instrumented optimizer inside `optimizer` (e.g. a `LossScaleOptimizer`), or None."""
    while optimizer is not None and not isinstance(optimizer, Instrumented):
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return optimizer


_INSTRUMENTED = {}


def instrument(optimizer_class, *, sign_reference_slot=None):
    """Returns an instrumented subclass of a Keras optimizer class (cached per class).

    The class is named `Instrumented<Name>` and registered for serialisation (package
    `optiscope` for Keras' optimizers, `optiscope.<module>` for others), so `.keras` files
    that use it load once it has been created.

    Args:
        optimizer_class: a subclass of `keras.optimizers.Optimizer`.
        sign_reference_slot: the name of a first-moment slot with the gradient's sign
            convention, which enables `sign_agreement`. Defaults to None.
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, keras.Optimizer)):
        raise TypeError(
            "Argument `optimizer_class` must be a subclass of keras.optimizers.Optimizer. "
            f"Received: optimizer_class={optimizer_class!r}"
        )
    if issubclass(optimizer_class, Instrumented):
        return optimizer_class
    if optimizer_class not in _INSTRUMENTED:
        name = f"Instrumented{optimizer_class.__name__}"
        attributes = {
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": (
                f"`{optimizer_class.__name__}` with optiscope statistics (see `Instrumented`)."
            ),
        }
        if sign_reference_slot is not None:
            attributes["_sign_reference_slot"] = sign_reference_slot
        module = optimizer_class.__module__
        if module.startswith("keras."):
            attributes["_keras_builtin"] = optimizer_class
        cls = type(name, (Instrumented, optimizer_class), attributes)
        # Keras' own optimizers register as "optiscope>Instrumented<Name>"; others under their
        # module too, so that a user's `Adam` never replaces the built-in's registration.
        package = "optiscope" if module.startswith("keras.") else f"optiscope.{module}"
        _INSTRUMENTED[optimizer_class] = keras.saving.register_keras_serializable(package=package)(
            cls
        )
    return _INSTRUMENTED[optimizer_class]
