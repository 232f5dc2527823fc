"""The registry of named objectives: :data:`OBJECTIVES` and :func:`get_objective`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from torch import Tensor

from ._forget import (
    ga_loss,
    idk_dpo_loss,
    idk_nll_loss,
    npo_loss,
    satimp_loss,
    simnpo_loss,
    wga_loss,
)
from ._objective import Level, LossInputs, Objective, RetainTerm, _ForgetFn, _need

__all__ = ["OBJECTIVES", "get_objective"]


def _ga(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "ga")
    return ga_loss(f.logits, f.labels, num_items=n)


def _npo(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "npo", ref=True)
    return npo_loss(f.logits, f.labels, f.ref_logits, hp["beta"], num_items=n)  # type: ignore[arg-type]


def _simnpo(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "simnpo")
    return simnpo_loss(f.logits, f.labels, hp["beta"], hp["delta"], num_items=n)


def _wga(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "wga")
    return wga_loss(f.logits, f.labels, hp["beta"], num_items=n)


def _satimp(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "satimp")
    return satimp_loss(f.logits, f.labels, hp["beta1"], hp["beta2"], num_items=n)


def _idk_nll(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    i = _need(i, "idk", "idk_nll")
    return idk_nll_loss(i.logits, i.labels, num_items=n)


def _idk_dpo(f: LossInputs | None, i: LossInputs | None, hp: Mapping[str, float], n: Any) -> Tensor:
    f = _need(f, "forget", "idk_dpo", ref=True)
    i = _need(i, "idk", "idk_dpo", ref=True)
    assert i.ref_logits is not None and f.ref_logits is not None  # checked by _need(ref=True)
    return idk_dpo_loss(
        i.logits,
        i.labels,
        f.logits,
        f.labels,
        i.ref_logits,
        f.ref_logits,
        hp["beta"],
        num_items=n,
    )


def _make(
    name: str,
    fn: _ForgetFn,
    level: Level,
    needs_ref: bool,
    retain: RetainTerm | None,
    hparams: dict[str, float],
    description: str,
    uses_forget: bool = True,
    uses_idk: bool = False,
) -> Objective:
    hp = dict(hparams)
    if retain is not None:
        hp["alpha"] = 1.0
    return Objective(
        name=name,
        forget_level=level,
        forget_needs_reference=needs_ref,
        retain_term=retain,
        uses_forget=uses_forget,
        uses_idk=uses_idk,
        hparams=MappingProxyType(hp),
        description=description,
        _forget_fn=fn,
    )


def _registry() -> dict[str, Objective]:
    base: list[tuple[str, _ForgetFn, Level, bool, dict[str, float], str, bool, bool]] = [
        ("ga", _ga, "token", False, {}, "gradient ascent", True, False),
        ("npo", _npo, "sequence", True, {"beta": 0.1}, "NPO", True, False),
        ("simnpo", _simnpo, "sequence", False, {"beta": 2.5, "delta": 0.0}, "SimNPO", True, False),
        ("wga", _wga, "token", False, {"beta": 1.0}, "weighted GA", True, False),
        ("satimp", _satimp, "token", False, {"beta1": 5.0, "beta2": 1.0}, "SatImp", True, False),
        ("idk_nll", _idk_nll, "token", False, {}, "NLL on I-don't-know answers", False, True),
        (
            "idk_dpo",
            _idk_dpo,
            "sequence",
            True,
            {"beta": 0.1},
            "DPO: IdK over the answer",
            True,
            True,
        ),
    ]
    out: dict[str, Objective] = {}
    for name, fn, level, ref, hp, desc, uf, ui in base:
        out[name] = _make(name, fn, level, ref, None, hp, desc, uf, ui)
        out[f"{name}_rt"] = _make(
            f"{name}_rt", fn, level, ref, "nll", hp, desc + " + retain NLL", uf, ui
        )
        out[f"{name}_kl"] = _make(
            f"{name}_kl", fn, level, ref, "kl", hp, desc + " + retain KL", uf, ui
        )
    out["graddiff"] = dataclasses.replace(out["ga_rt"], name="graddiff")
    return out


OBJECTIVES: Mapping[str, Objective] = MappingProxyType(_registry())
"""All named objectives. ``<base>`` is the forget term alone, ``<base>_rt`` adds
``alpha *`` retain NLL and ``<base>_kl`` adds ``alpha *`` KL to the reference on the retain
answers, for base in ``ga, npo, simnpo, wga, satimp, idk_nll, idk_dpo``; ``graddiff`` is
``ga_rt`` (gradient difference) and ``ga_kl`` is TOFU's "KL" method."""

_ALIASES = {"grad_diff": "graddiff", "gd": "graddiff", "gradient_ascent": "ga", "kl": "ga_kl"}


def get_objective(name: str, **hparams: float) -> Objective:
    """The objective registered under ``name`` (case-insensitive; see :data:`OBJECTIVES`),
    with ``hparams`` overriding its defaults (e.g. ``get_objective("npo", beta=0.05)``)."""
    key = name.lower().replace("-", "_").replace("+", "_")
    key = _ALIASES.get(key, key)
    if key not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    obj = OBJECTIVES[key]
    return obj.with_params(**hparams) if hparams else obj
