"""The GRU optimizer's state dict: the inner optimizer's, with the memory merged in.

Format: ``{"state": {k: {...inner entries..., EMA_KEY: m}}, "param_groups": [...]}``,
the canonical ``torch.optim`` layout (parameters numbered in group order), GRU's
hyperparameters in the groups under their ``gru_`` keys. Loading validates everything
before it changes anything: on any error the optimizer is as it was.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ._engine import Engine
from ._groups import check_gamma, check_retain_weight, fill_groups, unread_rule_keys
from ._memory import EMA_KEY, HISTORY_KEY, RetainMemory
from ._sources import ParamSource

__all__ = ["GRU_STATE_KEY", "load_state", "save_state", "torch_index"]


GRU_STATE_KEY = "gru_state"
"""Where :func:`save_state` keeps the memory when the inner optimizer's state dict is not
in torch's format (``pytorch_optimizer.Lookahead``: ``lookahead_state`` and
``base_optimizer``): ``{"state": {k: {EMA_KEY: m, ...}}}``, parameters numbered as
torch numbers them (:func:`torch_index`), beside the inner optimizer's own keys."""


def _is_standard(sd: Any) -> bool:
    """Whether ``sd`` is in torch's format (``state`` and ``param_groups``)."""
    return (
        isinstance(sd, dict)
        and isinstance(sd.get("state"), dict)
        and isinstance(sd.get("param_groups"), list)
    )


def torch_index(groups: list[dict[str, Any]]) -> dict[int, int]:
    """The index ``torch.optim.Optimizer.state_dict`` gives each parameter (by ``id``),
    exactly as torch numbers them: in group order, each group's numbering starting after
    all the entries of the groups before it (duplicates included); a parameter listed
    twice in one group (tied weights) gets its *last* position in the first group that
    lists it (torch's mapping is updated group by group, later entries of a group
    overwriting earlier ones)."""
    index: dict[int, int] = {}
    start = 0
    for group in groups:
        new: dict[int, int] = {}
        for i, p in enumerate(group["params"], start):
            if id(p) not in index:
                new[id(p)] = i
        index.update(new)
        start += len(group["params"])
    return index


def save_state(engine: Engine, source: ParamSource) -> dict[str, Any]:
    """The inner optimizer's state dict with the memory merged in (the optimizer's own
    state-dict hooks are the caller's)."""
    sd = source.inner.state_dict()
    standard = _is_standard(sd)
    state = dict(sd["state"]) if standard else {}
    params = source.params()
    index = torch_index(source.groups)
    memory = engine.memory
    for p in params:
        if p in memory or p.requires_grad:
            k = index[id(p)]
            entry = dict(state.get(k, {}))
            entry[EMA_KEY] = memory.entry(p)
            if memory.history:
                entry[HISTORY_KEY] = memory.history_entry(p)
            state[k] = entry
    if standard:
        return {"state": state, "param_groups": sd["param_groups"]}
    return {**sd, GRU_STATE_KEY: {"state": state}}


def _check_groups(engine: Engine, source: ParamSource, saved_groups: Any) -> None:
    groups = source.groups
    if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups):
        raise ValueError("not an optimizer state dict: 'param_groups' must be a list of dicts")
    if len(groups) != len(saved_groups):
        raise ValueError(
            f"state dict has {len(saved_groups)} parameter groups, the optimizer "
            f"{len(groups)}: it comes from another model or optimizer"
        )
    ours = set(engine.hdefaults) | {"params"}
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        if "params" not in sg or len(g["params"]) != len(sg["params"]):
            raise ValueError(
                f"parameter group {i} has {len(g['params'])} parameters but the state "
                f"dict's has {len(sg.get('params', []))}: it comes from another model"
            )
        missing = set(g) - set(sg) - ours
        unknown = set(sg) - set(g) - ours
        if missing and unknown:
            raise ValueError(
                f"parameter group {i} of the state dict has hyperparameters "
                f"{sorted(unknown)} but not {sorted(missing)}: it comes from another "
                f"optimizer class than {type(source.inner).__name__}"
            )
        where = f" (state dict param_groups[{i}])"
        if "gru_gamma" in sg:
            check_gamma(sg["gru_gamma"], where)
        if "gru_retain_weight" in sg:
            check_retain_weight(sg["gru_retain_weight"], where)
        for key in engine.rule.hyperparameters:
            if key in sg:
                engine.rule.check(key, sg[key], where)
        unread = unread_rule_keys(sg, engine.rule.hyperparameters)
        if unread:
            key = unread[0]
            raise ValueError(
                f"the state dict's param_groups[{i}] has {key}={sg[key]!r}, which this "
                f"GRUOptimizer's rule ({engine.rule.name}) does not read: it comes from one "
                f"with cos_clip; build this one with cos_clip={sg[key]!r} to resume it (or "
                "drop the key from the state dict's param_groups to train without cos clip)"
            )


# LBFGS's entry (kept in its first parameter's state): these keys appear as it runs.
_LBFGS_CORE = frozenset({"func_evals", "n_iter"})
_LBFGS_GROWN = frozenset(
    {"al", "d", "t", "old_dirs", "old_stps", "ro", "H_diag", "prev_flat_grad", "prev_loss"}
)
_LBFGS_KEYS = _LBFGS_CORE | _LBFGS_GROWN


def _check_inner_entry(
    k: Any, p: Tensor, entry: dict[str, Any], current: dict[str, Any] | None, flat: set[int]
) -> None:
    """The inner optimizer's entry for ``p`` must fit ``p`` and this optimizer class.

    The entry's keys must be the ones this optimizer keeps, except for the keys an
    optimizer adds as it runs (LBFGS writes ``al`` only once it has a history): an older
    checkpoint may lack those, never the others."""
    if current:
        lbfgs_older = (
            _LBFGS_CORE <= set(current)
            and _LBFGS_CORE <= set(entry) <= _LBFGS_KEYS
            and set(current) - set(entry) <= _LBFGS_GROWN
        )
        if set(current) != set(entry) and not lbfgs_older:
            raise ValueError(
                f"state of parameter {k} has entries {sorted(entry)}, this optimizer keeps "
                f"{sorted(current)}: the state dict comes from another optimizer"
            )
        for name, v in entry.items():
            c = current[name]
            if (
                isinstance(v, Tensor)
                and isinstance(c, Tensor)
                and name != "step"
                and v.shape != c.shape
            ):
                raise ValueError(
                    f"state {name!r} of parameter {k} has shape {tuple(v.shape)}, this "
                    f"optimizer's {tuple(c.shape)}: the state dict comes from another model"
                )
    for name, v in entry.items():
        # Per-parameter buffers (exp_avg, momentum_buffer, ...) have the parameter's
        # shape; factored ones (Adafactor's row/col variances) have 1 where they are
        # reduced; flat ones (LBFGS) the size of all parameters of a group.
        if (
            isinstance(v, Tensor)
            and v.dim() == p.dim() > 0
            and any(a not in (b, 1) for a, b in zip(v.shape, p.shape))
            and not (v.dim() == 1 and v.numel() in flat)
        ):
            raise ValueError(
                f"state {name!r} of parameter {k} has shape {tuple(v.shape)}, the "
                f"parameter {tuple(p.shape)}: the state dict comes from another model"
            )


def load_state(engine: Engine, source: ParamSource, state_dict: Any) -> None:
    """Validate ``state_dict`` entirely, then load it into the inner optimizer and the
    memory (the optimizer's own load hooks are the caller's)."""
    if isinstance(state_dict, dict) and GRU_STATE_KEY in state_dict:
        _load_foreign(engine, source, state_dict)
        return
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        if isinstance(state_dict, dict) and not _is_standard(source.inner.state_dict()):
            # A state dict of the plain inner optimizer in its own format: no memory.
            _load_foreign(engine, source, {**state_dict, GRU_STATE_KEY: {"state": {}}})
            return
        raise ValueError("not an optimizer state dict: expected keys 'state' and 'param_groups'")
    if not isinstance(state_dict["state"], dict):
        raise ValueError("not an optimizer state dict: 'state' must be a dict")
    inner = source.inner
    saved_groups = state_dict["param_groups"]
    _check_groups(engine, source, saved_groups)
    id_to_param: dict[Any, Tensor] = {}
    flat: set[int] = {sum(p.numel() for p in source.params())}
    for g, sg in zip(inner.param_groups, saved_groups):
        flat.add(sum(p.numel() for p in g["params"]))
        for p, k in zip(g["params"], sg["params"]):
            id_to_param[k] = p
    inner_state: dict[Any, Any] = {}
    emas: dict[Tensor, Tensor] = {}
    histories: dict[Tensor, list[Tensor]] = {}
    with_memory = False
    for k, entry in state_dict["state"].items():
        if k not in id_to_param:
            raise ValueError(f"state dict has state for unknown parameter {k!r}")
        if not isinstance(entry, dict):
            raise ValueError(f"state of parameter {k} is a {type(entry).__name__}, not a dict")
        p = id_to_param[k]
        entry = dict(entry)
        if EMA_KEY in entry:
            with_memory = True
            emas[p] = RetainMemory.check_entry(p, entry.pop(EMA_KEY), f"parameter {k}")
        if HISTORY_KEY in entry:
            histories[p] = engine.memory.check_history(p, entry.pop(HISTORY_KEY), f"parameter {k}")
        _check_inner_entry(k, p, entry, inner.state.get(p), flat)
        if entry:
            inner_state[k] = entry
    if with_memory:
        key_of = {id(p): k for k, p in id_to_param.items()}
        absent = [
            key_of[id(p)] for p in source.trainable() if key_of[id(p)] not in state_dict["state"]
        ]
        if absent:
            raise ValueError(
                f"the state dict has no entry for parameter(s) {absent[:8]}, which are "
                "trainable: GRUOptimizer.state_dict() writes one for every trainable "
                "parameter, so it was truncated (or they were frozen when it was saved)"
            )
    prepared = engine.memory.prepare(emas, histories)
    old_state, old_groups = inner.state, inner.param_groups
    try:
        inner.load_state_dict({"state": inner_state, "param_groups": saved_groups})
    except BaseException:
        inner.state, inner.param_groups = old_state, old_groups
        raise
    engine.memory.commit(prepared)
    fill_groups(inner.param_groups, engine.hdefaults)


def _load_foreign(engine: Engine, source: ParamSource, state_dict: dict[str, Any]) -> None:
    """Load a state dict whose inner part is not in torch's format: the memory under
    :data:`GRU_STATE_KEY` is validated first, the rest goes to the inner optimizer's own
    ``load_state_dict`` (which validates its part), then the memory is installed."""
    rest = {k: v for k, v in state_dict.items() if k != GRU_STATE_KEY}
    gru = state_dict[GRU_STATE_KEY]
    if not isinstance(gru, dict) or not isinstance(gru.get("state"), dict):
        raise ValueError(f"not a GRU state dict: {GRU_STATE_KEY!r} must hold a 'state' dict")
    inner = source.inner
    index = torch_index(inner.param_groups)
    by_key = {index[id(p)]: p for p in source.params()}
    emas: dict[Tensor, Tensor] = {}
    histories: dict[Tensor, list[Tensor]] = {}
    for k, entry in gru["state"].items():
        if k not in by_key or not isinstance(entry, dict):
            raise ValueError(f"state dict has retain memory for unknown parameter {k!r}")
        p = by_key[k]
        if EMA_KEY in entry:
            emas[p] = RetainMemory.check_entry(p, entry[EMA_KEY], f"parameter {k}")
        if HISTORY_KEY in entry:
            histories[p] = engine.memory.check_history(p, entry[HISTORY_KEY], f"parameter {k}")
    if emas:
        absent = [k for k, p in by_key.items() if p.requires_grad and p not in emas]
        if absent:
            raise ValueError(
                f"the state dict has no retain memory for parameter(s) {absent[:8]}, which "
                "are trainable: it was truncated (or they were frozen when it was saved)"
            )
    prepared = engine.memory.prepare(emas, histories)
    inner.load_state_dict(rest)
    engine.memory.commit(prepared)
    fill_groups(inner.param_groups, engine.hdefaults)
