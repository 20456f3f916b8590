r"""Any optax ``GradientTransformation`` as an :class:`AbstractOptimizer`.

:func:`from_optax` wraps a transformation ``tx`` so that one discrete step *is*
``tx.update(g, state, params)`` followed by ``optax.apply_updates``: exact by construction, for
any pytree of parameters. The optax state is split leaf by leaf, by its path, into

- a **fast** part (first moments, momentum traces: what oscillates at the edge of stability),
  kept in ``Phase.momentum`` with the parameters in ``Phase.params``, and
- a **slow** part (second moments, step counts, schedule states), kept in ``Slow.nu``; the
  library's own ``Slow.count`` is a real-valued step counter beside it.

Both parts keep the optax state's own structure, with ``None`` where a leaf belongs to the
other part (``None`` for a part with no leaves, as for the built-ins: GD has no momentum).

**Classification.** optax's own state types are classified by (state type, field):

- fast: ``TraceState.trace``; ``mu`` of ``ScaleByAdamState`` (adam, adamw, nadam),
  ``ScaleByAmsgradState``, ``ScaleByLionState``, ``ScaleByBeliefState``,
  ``ScaleByNovogradState``, ``ScaleBySM3State`` and ``MuonState``; ``EmaState.ema``. These are
  momenta: they carry the period-2 oscillation into the *update direction*.
- slow: every ``count`` (any NamedTuple field of that name); ``nu`` (and ``nu_max``) of the
  adaptive states; ``ScaleByRssState.sum_of_squares``; adafactor's ``v_row``, ``v_col``, ``v``;
  ``ScaleByAdaDeltaState``; the hyperparameters and schedule states of ``inject_hyperparams``;
  ``MuonState.ns_coeffs``; the counters of ``apply_if_finite`` and the conditional wrappers.
- ``ScaleByRStdDevState.mu`` (centred RMSProp) is **slow**: it is a running mean of ``g`` with
  the same decay as ``nu``, it enters only the denominator ``sqrt(nu - mu^2 + eps)`` (a
  preconditioner statistic, not a direction), it is fed by ``g`` alone, and its period-2
  alternation has the same form as ``nu``'s, so the exact period-2 slow feed covers it too.

Nested states (``chain``, ``masked``, ``partition``, ``inject_hyperparams``) are walked; a leaf
takes the class of the innermost (type, field) on its path that has one. Anything else (an
unknown state type, a PRNG key) must be classified by the caller with ``fast=`` / ``slow=``
(a predicate on the path string such as ``"[0].mu['w']"``, or a regular expression searched in
it); :class:`~rodflow_jax.InputError` names every leaf that no rule covers.

**Counts.** Integer and boolean leaves are slow and are held as floats of the parameters' dtype,
because the flows integrate the slow state as real numbers (the rod's count sits at
``k + 1/2``). The discrete ``step`` hands them back to optax in its own integer dtype, so a run
is bit-for-bit optax's. The flows' maps ``S`` and ``T`` hand them over as the real numbers they
are: optax's counters are dtype-generic (``safe_increment``, bias corrections
``1 - b**count``, schedules), so bias corrections and schedules see the real-valued time a flow
gives them, as the built-ins do. (At integer counts the two agree up to optax's own precision
for integer counts: a schedule of an ``int32`` count evaluates in float32, about 1e-9 off the
float64 value.) ``integer_counts=True`` makes the maps round too (for transformations that
index or compare with their counter). Boolean leaves are always cast back (``x > 1/2``).

**The maps.** ``S`` (``slow_map(slow, g)``) runs ``tx.update`` with placeholder zeros for the
fast state and the parameters and keeps the slow outputs, so the optax state's slow outputs must
not depend on its fast part or on the parameters: :meth:`OptaxOptimizer.init` checks this
numerically (at concrete parameters) and raises :class:`~rodflow_jax.InputError` naming the
leaves that do (adabelief's ``nu`` is fed by ``g - mu``; classify ``mu`` slow to use it).

``T`` (``fast_map(phase, g, slow, new_slow)``) must use the slow state ``new_slow`` it is given
where the step reads the updated slow state; the rod flow passes each endpoint a ``new_slow``
that is *not* that endpoint's own ``S(s, g)`` (the exact period-2 feed pulls it towards the
two endpoints' mean). An opaque ``tx`` cannot be handed ``s'``; it computes ``s' = U(s, g)``
itself. So with ``honour_new_slow=True`` (the default) ``T`` runs ``tx.update`` from the slow
input

.. math::

    \hat s = s + D^{-1} \big(s'_{\rm given} - U(s, g)\big), \qquad
    D = \operatorname{diag} \partial U / \partial s \ \ \text{(one JVP with tangent 1)},

one Newton step that makes ``tx.update`` produce exactly ``s'_given`` when ``U`` is affine in
``s`` with a diagonal Jacobian: true of every optax counter and moving average
(``b s + (1-b) f(g)``, ``s + 1``, ``s + g^2``). Where ``D = 0`` (an output that does not depend
on its input) no correction is possible and that element keeps ``U(s, g)``. When
``s'_given = U(s, g)`` (a discrete step, the stable flow) ``\hat s = s`` exactly. This is
faithful when the update reads the slow state only through its new value, as optax's moments
do (bias corrections use the incremented count; schedules read the old count, which the rod
never moves off ``s + 1``). It also makes "the slow state frozen" mean the same for a wrapped
``tx`` as for the built-ins (the preconditioner held fixed), which the generic edge probe
(:mod:`rodflow_jax._edge`) relies on. ``honour_new_slow=False`` ignores ``new_slow``: every
endpoint then divides by its own naive feed ``S(s, g_end)``, i.e. the rod is the
``exact_slow_feed=False`` rod whatever that flag says.

**Slow alternation.** The rod's exact period-2 feed needs the decay ``b`` of the slow state's
moving average (``slow_alternation() = 1/(1 + b)``). It is not visible from outside ``tx``; pass
``slow_decay=b`` or infer it with :func:`infer_slow_decay`. Without it the factor is 1 (the
naive feed).

**Threshold.** There is no formula for an arbitrary ``tx``: ``threshold`` is NaN,
``analytic_threshold`` is False and ``threshold_quantity`` is ``"edge ratio"``; use the generic
matrix-free edge probe, :func:`rodflow_jax._edge.edge_probe`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Callable, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import InputError, unknown_name
from ._base import AbstractOptimizer, Phase, Slow, _float_dtype

FAST, SLOW = "fast", "slow"

# (state type, field) -> class, for optax's own states. Fields that hold nested states
# (``inner_state``, ``inner_states``, ``base_optimizer_state``) are absent: the walk goes on.
_RULES: dict[tuple[str, str], str] = {
    ("TraceState", "trace"): FAST,
    ("EmaState", "ema"): FAST,
    ("ScaleByAdamState", "mu"): FAST,
    ("ScaleByAdamState", "nu"): SLOW,
    ("ScaleByAmsgradState", "mu"): FAST,
    ("ScaleByAmsgradState", "nu"): SLOW,
    ("ScaleByAmsgradState", "nu_max"): SLOW,
    ("ScaleByLionState", "mu"): FAST,
    ("ScaleByBeliefState", "mu"): FAST,
    ("ScaleByBeliefState", "nu"): SLOW,
    ("ScaleByNovogradState", "mu"): FAST,
    ("ScaleByNovogradState", "nu"): SLOW,
    ("ScaleBySM3State", "mu"): FAST,
    ("ScaleBySM3State", "nu"): SLOW,
    ("MuonState", "mu"): FAST,
    ("MuonState", "ns_coeffs"): SLOW,
    ("ScaleByRmsState", "nu"): SLOW,
    ("ScaleByRmsWithCountState", "nu"): SLOW,
    ("ScaleByRStdDevState", "mu"): SLOW,
    ("ScaleByRStdDevState", "nu"): SLOW,
    ("ScaleByRStdDevWithCountState", "mu"): SLOW,
    ("ScaleByRStdDevWithCountState", "nu"): SLOW,
    ("ScaleByRssState", "sum_of_squares"): SLOW,
    ("ScaleByAdaDeltaState", "e_g"): SLOW,
    ("ScaleByAdaDeltaState", "e_x"): SLOW,
    ("FactoredState", "v_row"): SLOW,
    ("FactoredState", "v_col"): SLOW,
    ("FactoredState", "v"): SLOW,
    ("InjectHyperparamsState", "hyperparams"): SLOW,
    ("InjectStatefulHyperparamsState", "hyperparams"): SLOW,
    ("InjectStatefulHyperparamsState", "hyperparams_states"): SLOW,
    ("ApplyIfFiniteState", "notfinite_count"): SLOW,
    ("ApplyIfFiniteState", "last_finite"): SLOW,
    ("ApplyIfFiniteState", "total_notfinite"): SLOW,
    ("ConditionallyMaskState", "step"): SLOW,
    ("ConditionallyTransformState", "step"): SLOW,
    ("ZeroNansState", "found_nan"): SLOW,
}
_ANY_COUNT = "count"  # a NamedTuple field of this name is a step counter: slow
# second moments optax takes a square root of: values below a floor just above the smallest normal
# number (an exact 0 on a coordinate whose gradient was always 0) are read as that floor, so that
# sqrt's derivative is finite (0 * inf = NaN otherwise); sqrt(floor) < 2e-16 (float32) and 2e-145
# (float64) is below the rounding of any eps > 1e-8 / 1e-130, so the values do not change
_SQRT_FED = {("ScaleByAdamState", "nu"), ("ScaleByAmsgradState", "nu"), ("ScaleByAmsgradState", "nu_max"),
             ("ScaleByRmsState", "nu"), ("ScaleByRmsWithCountState", "nu"), ("ScaleByBeliefState", "nu"),
             ("ScaleByRStdDevState", "nu"), ("ScaleByRStdDevWithCountState", "nu"), ("ScaleByRssState", "sum_of_squares")}


def _sqrt_fed(state, path) -> bool:
    owners = _owners(state, path)
    return bool(owners) and next((o for o in reversed(owners) if o in _RULES), None) in _SQRT_FED


def _off_zero(x):
    floor = jnp.finfo(x.dtype).tiny * 2.0 ** (20 if jnp.finfo(x.dtype).bits <= 32 else 60)  # no subnormals next step
    return x + jax.lax.stop_gradient(jnp.where(x < floor, floor - x, 0))  # derivative 1, as for x itself


# --- classifying the optax state's leaves ----------------------------------------------------
def _owners(state, path) -> list[tuple[str, str]]:
    """``(type name, field)`` for every attribute step on ``path`` from the root of ``state``."""
    owners, node = [], state
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            owners.append((type(node).__name__, key.name))
            node = getattr(node, key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            node = node[key.idx]
        elif isinstance(key, jax.tree_util.DictKey):
            node = node[key.key]
        else:  # a custom node flattened by index: its children cannot be named
            break
    return owners


def _auto_class(state, path) -> str | None:
    """The class optax's own state types give this leaf (innermost rule wins), else ``None``."""
    owners = _owners(state, path)
    for owner in reversed(owners):
        if owner in _RULES:
            return _RULES[owner]
    if owners and owners[-1][1] == _ANY_COUNT and isinstance(path[-1], jax.tree_util.GetAttrKey):
        return SLOW
    return None


def _as_predicate(rule) -> Callable[[str], bool] | None:
    if rule is None or callable(rule):
        return rule
    if isinstance(rule, str):
        pattern = re.compile(rule)
        return lambda p: pattern.search(p) is not None
    raise InputError(f"fast=/slow= must be a predicate on the path string or a regular expression, got {rule!r}")


def classify(state, fast=None, slow=None) -> list[tuple[str, str]]:
    """``(path string, "fast" | "slow")`` for every leaf of an optax state, in leaf order.

    ``fast`` / ``slow`` (a predicate on the path string, or a regular expression) override the
    automatic rules. Raises :class:`InputError` naming every leaf no rule covers, or any leaf
    that both overrides claim.
    """
    is_fast, is_slow = _as_predicate(fast), _as_predicate(slow)
    out, missing, both = [], [], []
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        p = jax.tree_util.keystr(path)
        f, s = bool(is_fast and is_fast(p)), bool(is_slow and is_slow(p))
        if f and s:
            both.append(p)
        cls = FAST if f else SLOW if s else _auto_class(state, path)
        if cls is None:
            missing.append(p)
        out.append((p, cls))
    if both:
        raise InputError(f"optax state leaves {', '.join(both)} are claimed by both fast= and slow=")
    if missing:
        raise InputError(
            f"cannot tell whether optax state leaves {', '.join(missing)} are fast (oscillating, like "
            "a momentum) or slow (smooth, like a second moment or a step count); pass fast= or slow= "
            "(a predicate on the path string, or a regular expression) to classify them"
        )
    return out


def _is_exact(dtype) -> bool:
    """Integer and boolean leaves: held as floats, converted back when optax reads them."""
    return jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)


def _check_kinds(template, classes) -> None:
    bad = []
    for (p, cls), leaf in zip(classes, jax.tree.leaves(template)):
        dt = leaf.dtype
        ok = jnp.issubdtype(dt, jnp.inexact) or (cls == SLOW and _is_exact(dt))
        if not ok:
            bad.append(f"{p} ({cls}, dtype {dt})")
    if bad:
        raise InputError(
            f"optax state leaves {', '.join(bad)} cannot be integrated as real numbers (fast leaves "
            "must be floating point; slow ones floating point, integer or boolean)"
        )


def _from_real(x, dtype, integer_counts: bool):
    """A slow leaf as optax reads it: booleans cast back, integer counts rounded if asked."""
    if jnp.issubdtype(dtype, jnp.bool_):
        return x > 0.5
    if jnp.issubdtype(dtype, jnp.integer) and integer_counts:
        return jnp.round(x).astype(dtype)
    return x


def _unknown_learning_rate(count):
    """The step size of a wrapped transformation is not known from outside it."""
    return jnp.full_like(count, jnp.nan)


# --- the optimizer -------------------------------------------------------------------------
class OptaxOptimizer(AbstractOptimizer):
    r"""An optax transformation as a fast map ``T`` and a slow map ``S``; see the module docstring.

    ``step`` is one ``tx.update`` plus ``optax.apply_updates`` (bit-for-bit optax's step).
    The transformation's hyperparameters are closed over inside ``tx``: they are not array
    leaves, so unlike the built-ins they cannot be vmapped or differentiated.
    """

    threshold_quantity: ClassVar[str] = "edge ratio"
    analytic_threshold: ClassVar[bool] = False

    learning_rate: Any = eqx.field(static=True)  # informational; the step size lives in tx
    base_tx: optax.GradientTransformation | None = eqx.field(static=True)
    name: str = eqx.field(static=True)
    factory: Callable | None = eqx.field(static=True, default=None)
    static_args: tuple = eqx.field(static=True, default=())
    fast_rule: Any = eqx.field(static=True, default=None)
    slow_rule: Any = eqx.field(static=True, default=None)
    hparams: dict = eqx.field(default_factory=dict)
    slow_decay: jax.Array | None = None
    infer_decay: bool = eqx.field(static=True, default=False)
    untraceable: str | None = eqx.field(static=True, default=None)  # why a factory's floats stay static
    integer_counts: bool = eqx.field(static=True, default=False)
    honour_new_slow: bool = eqx.field(static=True, default=True)

    @property
    def tx(self) -> optax.GradientTransformation:
        """The transformation: as given, or ``factory(**static_args, **hparams)`` (rebuilt from
        the current, possibly traced or batched, float hyperparameters)."""
        if self.factory is None:
            return self.base_tx
        return self.factory(**dict(self.static_args), **self.hparams)

    # --- splitting and assembling the optax state --------------------------------------------
    def _classes(self, template):
        classes = classify(template, self.fast_rule, self.slow_rule)
        _check_kinds(template, classes)
        return [c for _, c in classes]

    def split(self, state, dtype) -> tuple[Any, Any]:
        """``(fast part, slow part)`` of an optax state; integer/boolean leaves become ``dtype``."""
        leaves, treedef = jax.tree.flatten(state)
        classes = self._classes(state)
        fast = [x if c == FAST else None for x, c in zip(leaves, classes)]
        slow = [(jnp.asarray(x).astype(dtype) if _is_exact(jnp.result_type(x)) else x) if c == SLOW else None
                for x, c in zip(leaves, classes)]
        fast = jax.tree.unflatten(treedef, fast) if FAST in classes else None
        slow = jax.tree.unflatten(treedef, slow) if SLOW in classes else None
        return fast, slow

    def merge(self, params, fast, slow, *, integer_counts: bool | None = None):
        """The optax state for ``params`` from its two parts (the inverse of :meth:`split`).

        Integer counts are rounded back to optax's dtype if ``integer_counts`` (default: the
        optimizer's ``integer_counts``), else handed over as the real numbers they are here."""
        integer_counts = self.integer_counts if integer_counts is None else integer_counts
        template = jax.eval_shape(self.tx.init, params)
        flat, treedef = jax.tree_util.tree_flatten_with_path(template)
        classes = self._classes(template)
        fast_leaves = iter(jax.tree.leaves(fast))
        slow_leaves = iter(jax.tree.leaves(slow))
        out = []
        for (path, t), c in zip(flat, classes):
            if c == FAST:
                out.append(next(fast_leaves))
            else:
                x = _from_real(next(slow_leaves), t.dtype, integer_counts)
                out.append(_off_zero(x) if _sqrt_fed(template, path) else x)
        return jax.tree.unflatten(treedef, out)

    def _zero_fast(self, params):
        """A fast part of zeros, shaped as ``tx.init(params)``'s."""
        template = jax.eval_shape(self.tx.init, params)
        leaves, treedef = jax.tree.flatten(template)
        classes = self._classes(template)
        if FAST not in classes:
            return None
        return jax.tree.unflatten(
            treedef, [jnp.zeros(t.shape, t.dtype) if c == FAST else None for t, c in zip(leaves, classes)]
        )

    def slow_leaves(self, params) -> list[tuple[str, Any]]:
        """``(path, shape-dtype)`` of the slow leaves of ``tx.init(params)``, in ``Slow.nu`` order."""
        template = jax.eval_shape(self.tx.init, params)
        classes = self._classes(template)
        flat = jax.tree_util.tree_flatten_with_path(template)[0]
        return [(jax.tree_util.keystr(p), t) for (p, t), c in zip(flat, classes) if c == SLOW]

    def _update(self, params, fast, slow_nu, grad, integer_counts=None):
        """``(new params, new fast part, new slow part)`` from one ``tx.update``."""
        state = self.merge(params, fast, slow_nu, integer_counts=integer_counts)
        updates, state = self.tx.update(grad, state, params)
        new_fast, new_slow = self.split(state, _float_dtype(params))
        return optax.apply_updates(params, updates), new_fast, new_slow

    # --- the AbstractOptimizer contract -------------------------------------------------------
    def init_momentum(self, params):
        return self.split(self.tx.init(params), _float_dtype(params))[0]

    def init_nu(self, params):
        return self.split(self.tx.init(params), _float_dtype(params))[1]

    def init(self, params) -> tuple[Phase, Slow]:
        """The initial state; at concrete ``params`` also checks that ``S`` needs only ``(s, g)``."""
        phase, slow = super().init(params)
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(params)):
            _check_slow_independence(self, params, phase, slow)
        return phase, slow

    def step(self, phase: Phase, slow: Slow, grad) -> tuple[Phase, Slow]:
        """Exactly optax's step: one ``tx.update`` on the assembled state (counts in optax's own
        integer dtype), then ``apply_updates``."""
        params, fast, nu = self._update(phase.params, phase.momentum, slow.nu, grad, integer_counts=True)
        return Phase(params, fast), Slow(slow.count + 1, nu)

    def slow_map(self, slow, grad):
        """``S``: the slow outputs of ``tx.update`` (fast state and parameters set to zeros)."""
        zeros = jax.tree.map(jnp.zeros_like, grad)
        return Slow(slow.count + 1, self._update(zeros, self._zero_fast(zeros), slow.nu, grad)[2])

    def fast_map(self, phase, grad, slow, new_slow):
        """``T``: ``tx.update`` from the slow input whose update is ``new_slow`` (see the module
        docstring; with ``honour_new_slow=False``, from ``slow`` itself, ignoring ``new_slow``)."""
        nu = slow.nu
        if self.honour_new_slow and nu is not None:
            nu = self._slow_input_for(phase, grad, nu, new_slow.nu)
        params, fast, _ = self._update(phase.params, phase.momentum, nu, grad)
        return Phase(params, fast)

    def _slow_input_for(self, phase, grad, nu, target):
        r"""``s + D^{-1}(target - U(s, g))``, ``D`` the diagonal of ``dU/ds`` (exact for EMAs)."""

        def update_slow(s):
            return self._update(phase.params, phase.momentum, s, grad)[2]

        u0, d = jax.jvp(update_slow, (nu,), (jax.tree.map(jnp.ones_like, nu),))

        def correct(s, t, u, di):
            ok = jnp.isfinite(di) & (di != 0)
            return s + jnp.where(ok, (t - u) / jnp.where(ok, di, 1), 0)

        leaves, treedef = jax.tree.flatten(nu)
        parts = zip(leaves, *(jax.tree.leaves(x) for x in (target, u0, d)))  # structures may differ by
        return jax.tree.unflatten(treedef, [correct(*xs) for xs in parts])  # empty subtrees only

    def threshold(self, slow):
        """No formula for an arbitrary transformation: NaN (use the generic edge probe)."""
        return jnp.full_like(slow.count, jnp.nan)

    def preconditioner(self, new_slow):
        return None

    def slow_alternation(self):
        """``1/(1 + b)`` with ``b = slow_decay`` if given, else 1 (the naive period-2 feed)."""
        if self.slow_decay is None:
            return jnp.ones(())
        return 1.0 / (1.0 + self.slow_decay)

    def hyperparameters(self):
        """The constructor's arguments by optax's names: for a factory, its float arguments
        (array leaves) and the others (static); for a built ``tx``, what the caller told
        :func:`from_optax`, else ``{}``."""
        return {**dict(self.static_args), **self.hparams}

    def prepared(self, params) -> "OptaxOptimizer":
        """With ``slow_decay="auto"``: the decay inferred at ``params`` (:func:`infer_slow_decay`;
        ``None``, the naive feed, where the slow state has no single decay). The drivers
        (compare, sweep, hypergradient) call this; a flow built by hand from an unprepared
        optimizer uses the naive feed."""
        if not self.infer_decay:
            return self
        try:
            b = infer_slow_decay(dataclasses.replace(self, infer_decay=False), params)
        except InputError:
            b = None
        return dataclasses.replace(self, infer_decay=False, slow_decay=None if b is None else jnp.asarray(b))

    def continuous_hyperparameters(self) -> tuple[str, ...]:
        """The names that can be swept and differentiated: a factory's float arguments."""
        return tuple(self.hparams) if self.factory is not None else ()

    def with_hyperparameters(self, **values) -> "OptaxOptimizer":
        """The same optimizer with some float arguments of its factory replaced (by numbers,
        tracers or batched arrays): what sweeps and hypergradients use."""
        bad = [k for k in values if k not in self.continuous_hyperparameters()]
        if bad:
            how = (f"its factory cannot be built from traced arguments ({self.untraceable}), so they are static"
                   if self.untraceable else
                   f"its continuous arguments are: {', '.join(self.continuous_hyperparameters())}"
                   if self.factory is not None else
                   "it wraps a built transformation; wrap the factory instead, "
                   "from_optax(optax.NAME, hyperparameters={...}), to sweep or differentiate its arguments")
            raise InputError(f"{self.name} has no continuous hyperparameter {', '.join(map(repr, bad))}; {how}")
        return dataclasses.replace(self, hparams={**self.hparams, **values})


def _check_numbers(label: str, factory, kwargs: dict) -> None:
    """One-line :class:`InputError` for a ``learning_rate`` that is not a positive number (a
    schedule, a callable, passes) and for a word given where the factory's default is a float
    (``b1=abc``): optax would take either and fail, or ascend, only once it runs."""
    try:
        signature = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        signature = {}
    for k, v in kwargs.items():
        default = signature[k].default if k in signature else None
        if isinstance(default, bool) and not isinstance(v, (bool, np.bool_)):
            raise InputError(f"{label}: {k}={v!r} must be true or false")
        numeric = k == "learning_rate" or (isinstance(default, float) and not isinstance(default, bool))
        if not numeric or callable(v) or isinstance(v, (jax.Array, np.ndarray)):
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InputError(f"{label}: {k}={v!r} must be a number")
        if not math.isfinite(float(v)):
            raise InputError(f"{label}: {k}={v!r} must be finite")
        if k == "learning_rate" and v <= 0:
            raise InputError(f"{label}: learning_rate must be positive, got {v!r}")


def _float_arguments(factory, kwargs: dict) -> tuple[dict, dict]:
    """``(float arguments, the others)`` of ``factory(**kwargs)``: given floats (and ints given
    where the signature's default is a float, or for ``learning_rate``) become array leaves;
    the signature's own float defaults join them, so ``b1`` is known and can be swept. Arguments
    with int defaults, bools, strings, ``None``, schedules and masks stay static."""
    try:
        signature = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        signature = {}

    def floatlike(k, v, default):
        if isinstance(v, bool) or callable(v) or v is None or isinstance(default, int):
            return False  # an int default (a size, an offset) is structural, a bool one a switch: static
        if isinstance(v, (float, np.floating)) or (isinstance(v, (jax.Array, np.ndarray)) and jnp.ndim(v) == 0
                                                   and jnp.issubdtype(jnp.result_type(v), jnp.floating)):
            return True
        return isinstance(v, (int, np.integer)) and (k == "learning_rate" or (
            isinstance(default, float) and not isinstance(default, bool)))

    floats, others = {}, {}
    for k, p in signature.items():
        d = p.default
        if k not in kwargs and isinstance(d, float):
            floats[k] = d
    for k, v in kwargs.items():
        d = signature[k].default if k in signature else None
        if floatlike(k, v, d):
            floats[k] = v if isinstance(v, jax.Array) else float(v)
        else:
            others[k] = v
    return floats, others


def from_optax(
    tx,
    *,
    fast=None,
    slow=None,
    name: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    slow_decay: float | str | None = "auto",
    integer_counts: bool = False,
    honour_new_slow: bool = True,
) -> OptaxOptimizer:
    """Wrap an optax transformation as an optimizer the flows can use.

    **Arguments:**

    - ``tx``: any ``optax.GradientTransformation`` (``optax.adamw(...)``, ``optax.chain(...)``),
      or a **factory** that builds one from keyword arguments (``optax.adamw``, or your own
      ``lambda learning_rate, weight_decay: optax.chain(...)``) with the arguments in
      ``hyperparameters``. Only a factory's float arguments are array leaves of the optimizer,
      so only a factory can be swept (``vmap``) and differentiated (hypergradients) in them.
    - ``fast`` / ``slow``: override the classification of state leaves: a predicate on the
      leaf's path string (``jax.tree_util.keystr``, e.g. ``"[0].mu['w']"``) or a regular
      expression searched in it. They take precedence over the automatic rules; a leaf that
      both match is an error.
    - ``name``: e.g. ``"optax:adamw"`` (default ``"optax"``, or ``"optax:" + factory name``).
    - ``hyperparameters``: a factory's arguments; for a built ``tx``, the arguments it was
      built with, for descriptions (``describe``, default start steps) only.
    - ``slow_decay``: the decay ``b`` of the slow moving averages, for the rod's exact period-2
      slow feed; ``"auto"`` (default) infers it at the first parameters a driver sees
      (:meth:`OptaxOptimizer.prepared`, :func:`infer_slow_decay`); ``None`` keeps the naive feed.
    - ``integer_counts``: make the flows' maps round integer counts back to optax's dtype
      (instead of handing optax the real-valued count a flow gives; ``step`` always rounds).
    - ``honour_new_slow``: make ``fast_map`` use the ``new_slow`` it is given (module docstring).

    Classification errors are raised when the state is first seen (``init``, or tracing a map).
    """
    hp = dict(hyperparameters or {})
    auto = isinstance(slow_decay, str)
    if auto and slow_decay != "auto":
        raise InputError(f"slow_decay must be a number, None or 'auto', got {slow_decay!r}")
    common = dict(fast_rule=fast, slow_rule=slow, infer_decay=auto,
                  slow_decay=None if slow_decay is None or auto else jnp.asarray(slow_decay),
                  integer_counts=integer_counts, honour_new_slow=honour_new_slow)
    if isinstance(tx, optax.GradientTransformation):
        lr = hp.get("learning_rate", _unknown_learning_rate)
        lr = lr if callable(lr) else float(lr)
        return OptaxOptimizer(learning_rate=lr, base_tx=tx, name=name or "optax", hparams=hp, **common)
    if not callable(tx):
        raise InputError(f"from_optax needs an optax GradientTransformation or a factory of one, got {type(tx).__name__}")
    label = getattr(tx, "__name__", "factory")
    _check_numbers(name or "optax." + label, tx, hp)
    floats, others = _float_arguments(tx, hp)
    try:
        built = tx(**hp)
    except (TypeError, ValueError) as e:
        raise InputError(f"{name or 'optax.' + label}({', '.join(f'{k}={v!r}' for k, v in hp.items())}): {e}"
                         ) from None
    if not isinstance(built, optax.GradientTransformation):
        raise InputError(f"{name or label}(...) returned a {type(built).__name__}, not a GradientTransformation")
    try:
        jax.jit(lambda h: (tx(**others, **h), jnp.zeros(()))[1])(floats)  # can it be built from tracers?
    except Exception as e:  # noqa: BLE001 - any failure means: its floats must stay Python numbers
        if floats:
            others, floats = {**others, **floats}, {}
            common["untraceable"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    try:
        static_args = tuple(sorted(others.items()))
        hash(static_args)
    except TypeError:
        raise InputError(f"the non-float arguments of {label} must be hashable (they are static): "
                         f"{', '.join(others)}") from None
    return OptaxOptimizer(learning_rate=_unknown_learning_rate, base_tx=None, name=name or f"optax:{label}",
                          factory=tx, static_args=static_args, hparams=floats, **common)


# --- checks and inference on a concrete state ----------------------------------------------
def _perturbed(tree, key, scale=1.0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for x, k in zip(leaves, keys)]
    )


def _check_slow_independence(opt: OptaxOptimizer, params, phase: Phase, slow: Slow) -> None:
    """Raise unless the slow outputs of ``tx.update`` are the same for other fast states and
    parameters (``S`` sees only ``(s, g)``)."""
    if slow.nu is None:
        return
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    g = _perturbed(jax.tree.map(jnp.zeros_like, params), k1)
    a = opt._update(params, phase.momentum, slow.nu, g)[2]
    fast2 = None if phase.momentum is None else _perturbed(phase.momentum, k2)
    b = opt._update(_perturbed(params, k3), fast2, slow.nu, g)[2]
    paths = [p for p, _ in opt.slow_leaves(params)]
    moved = [p for p, x, y in zip(paths, jax.tree.leaves(a), jax.tree.leaves(b))
             if not np.allclose(np.asarray(x), np.asarray(y), rtol=1e-9, atol=0.0)]
    if moved:
        raise InputError(
            f"the slow optax state leaves {', '.join(moved)} depend on the fast state or the parameters, "
            "but the slow map S(s, g) sees only the slow state and the gradient; classify what feeds "
            "them as slow too (slow=...)"
        )


def infer_slow_decay(optimizer: OptaxOptimizer, params) -> float | None:
    r"""The common decay ``b = dS/ds`` of the gradient-fed floating slow leaves, at the initial
    state for ``params``: the ``slow_decay`` that :func:`from_optax` needs for the rod's exact
    period-2 slow feed.

    For ``s' = b s + (1 - b) f(g)`` the derivative of the slow update in ``s`` is ``b`` in every
    element; one JVP reads it. Leaves the gradient does not feed (counts, constant
    hyperparameters) are skipped. Returns ``None`` if no leaf is fed; raises
    :class:`InputError` if the fed leaves do not share one decay (then no single
    ``slow_alternation`` factor is exact).
    """
    phase, slow = optimizer.init(params)
    if slow.nu is None:
        return None
    g = _perturbed(jax.tree.map(jnp.zeros_like, params), jax.random.PRNGKey(1))
    dg = _perturbed(jax.tree.map(jnp.zeros_like, params), jax.random.PRNGKey(2))

    def update_slow(s, grad):
        return optimizer._update(params, phase.momentum, s, grad)[2]

    _, d = jax.jvp(lambda s: update_slow(s, g), (slow.nu,), (jax.tree.map(jnp.ones_like, slow.nu),))
    _, fed = jax.jvp(lambda gr: update_slow(slow.nu, gr), (g,), (dg,))
    values = {}
    for (p, t), di, fi in zip(optimizer.slow_leaves(params), jax.tree.leaves(d), jax.tree.leaves(fed)):
        if not _is_exact(t.dtype) and np.any(np.asarray(fi) != 0):
            values[p] = np.asarray(di).ravel()
    if not values:
        return None
    allv = np.concatenate(list(values.values()))
    b = float(allv[0])
    if not np.allclose(allv, b, rtol=1e-9, atol=1e-12):
        desc = ", ".join(f"{p}: {np.min(v):.6g}..{np.max(v):.6g}" for p, v in values.items())
        raise InputError(f"the slow state has no single decay (dS/ds per leaf: {desc}); pass slow_decay= yourself")
    return b


# --- optax optimizers by name, for the command line ---------------------------------------
def _optax_names() -> list[str]:
    return sorted(n for n in dir(optax) if not n.startswith("_") and n.islower() and callable(getattr(optax, n)))


def optax_factory(name: str) -> Callable[..., optax.GradientTransformation]:
    """The factory ``optax.NAME`` (``NAME`` may be dotted: ``"contrib.muon"``), or a one-line
    :class:`InputError` for an unknown name or something that is not a factory."""
    obj = optax
    for part in name.split("."):
        if part.startswith("_") or not hasattr(obj, part):
            raise unknown_name("optax optimizer", name, _optax_names()) from None
        obj = getattr(obj, part)
    if not callable(obj) or isinstance(obj, type):
        raise InputError(f"optax.{name} is not an optimizer factory")
    return obj


def optax_by_name(name: str, **kwargs) -> optax.GradientTransformation:
    """``optax.NAME(**kwargs)``, with one-line :class:`InputError`s for an unknown name, bad
    arguments, or something that is not a gradient transformation."""
    obj = optax_factory(name)
    try:
        tx = obj(**kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"optax.{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {e}") from None
    if not isinstance(tx, optax.GradientTransformation):
        raise InputError(f"optax.{name}(...) returned a {type(tx).__name__}, not a GradientTransformation")
    return tx


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isnan(value):
            raise InputError(f"option value {text!r} is not a number optax can use")
        return value
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def parse_opt_args(text: str) -> dict[str, Any]:
    """``"learning_rate=0.1,weight_decay=1e-4,nesterov=true"`` -> ``{"learning_rate": 0.1, ...}``.

    Values become ints, floats, bools (``true``/``false``), ``None`` (``none``) or strings
    (optionally quoted). Commas separate options, so values cannot contain them.
    """
    out: dict[str, Any] = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not value:
            raise InputError(f"option {item!r} must read key=value")
        if not _KEY.match(key):
            raise InputError(f"option name {key!r} is not a valid argument name")
        if key in out:
            raise InputError(f"option {key!r} given twice")
        out[key] = _parse_value(value)
    return out
