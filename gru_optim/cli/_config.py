"""The options of ``gru-unlearn``: one table drives the flags, the YAML keys, their types,
defaults and the sweep. Flags override the YAML file, which overrides the defaults."""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "DEFAULTS",
    "OPTIONS",
    "UsageError",
    "parser",
    "resolve",
    "sweep_runs",
]


class UsageError(Exception):
    """Bad input: the message is one line that names the fix; the command exits 2 and
    writes nothing."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _params(value: Any) -> dict[str, float]:
    """``{"beta": 0.05}`` from a mapping or from ``"beta=0.05"`` strings."""
    if isinstance(value, Mapping):
        return {str(k): _float(v) for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    out: dict[str, float] = {}
    for item in items:
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected NAME=VALUE, got {item!r}")
        out[key.strip()] = _float(val)
    return out


def _sweep(value: Any) -> dict[str, list[Any]]:
    """``{"gamma": ["0.5", "0.8"]}`` from a mapping of lists or ``"gamma=0.5,0.8"``
    strings (the values are converted later, by the option's type)."""
    if isinstance(value, Mapping):
        return {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in value.items()}
    items = [value] if isinstance(value, str) else list(value)
    out: dict[str, list[Any]] = {}
    for item in items:
        key, sep, vals = str(item).partition("=")
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise ValueError(f"expected OPTION=V1,V2,..., got {item!r}")
        out[key.strip().replace("-", "_")] = values
    return out


@dataclass(frozen=True)
class Option:
    """One option: its type (a converter), default and help; ``flag`` is how the command
    line spells it (``--no-gru`` is a switch)."""

    convert: Callable[[Any], Any]
    default: Any
    help: str
    switch: bool = False
    sweepable: bool = True
    metavar: str | None = None


OPTIONS: dict[str, Option] = {
    "model": Option(
        _str,
        None,
        "a save_pretrained directory (model + tokenizer), or a hub id already in the local "
        "cache; none: the embedded demo (the study's tiny model and corpus)",
        sweepable=False,
    ),
    "forget": Option(
        _str,
        None,
        "rows to forget (JSONL, JSON, CSV, Parquet or a datasets folder)",
        sweepable=False,
    ),
    "retain": Option(_str, None, "rows to keep (same formats)", sweepable=False),
    "holdout": Option(
        _str, None, "rows never trained on: membership inference (optional)", sweepable=False
    ),
    "output": Option(
        _str,
        None,
        "the result directory (refused if it exists, see --overwrite)",
        sweepable=False,
    ),
    "method": Option(_str, "npo", "the unlearning objective (gru_optim.objectives.OBJECTIVES)"),
    "param": Option(
        _params, {}, "an objective hyperparameter, e.g. beta=0.05 (repeatable)", metavar="K=V"
    ),
    "gamma": Option(_float, 0.8, "GRU's memory weight of the new retain gradient"),
    "directions": Option(_int, 1, "GRU's retain directions (the cone of k directions)"),
    "space": Option(_str, "gradient", "rectify the 'gradient' or the optimizer's 'update'"),
    "cos_clip": Option(_float, None, "GRU's partial projection threshold (e.g. -0.5)"),
    "no_gru": Option(_bool, False, "the plain baseline: the objective without GRU", switch=True),
    "lr": Option(_float, 1e-5, "learning rate (AdamW, constant)"),
    "steps": Option(_int, None, "optimizer steps (instead of --epochs)"),
    "epochs": Option(_float, None, "epochs over the forget rows (default 5 without --steps)"),
    "batch_size": Option(_int, 8, "forget rows (each paired with a retain row) per device batch"),
    "grad_accum": Option(_int, 1, "micro-batches per optimizer step"),
    "max_grad_norm": Option(_float, 1.0, "clip the (rectified) gradient norm; 0: no clipping"),
    "weight_decay": Option(_float, 0.0, "AdamW weight decay"),
    "seed": Option(_int, 0, "seed of the initialisation, the data order and the pairing"),
    "bf16": Option(_bool, False, "train in bf16 mixed precision", switch=True),
    "lora": Option(_int, None, "train a LoRA adapter of this rank (PEFT), merged when saved"),
    "lora_alpha": Option(_int, None, "LoRA alpha (default 2 * rank)"),
    "max_length": Option(_int, 512, "truncate examples to this many tokens", sweepable=False),
    "prompt_format": Option(
        _str, "auto", "auto (chat template if any), chat or plain", sweepable=False
    ),
    "dtype": Option(
        _str, "float32", "load the model in float32, bfloat16 or auto", sweepable=False
    ),
    "eval_batch_size": Option(_int, 16, "rows per evaluation forward pass", sweepable=False),
    "gen_max_length": Option(
        _int, 200, "greedy generation stops at this total length", sweepable=False
    ),
    "save_steps": Option(
        _float, 0.2, "checkpoint every N steps (< 1: that fraction of the run), for --resume"
    ),
    "deepspeed": Option(_str, None, "a DeepSpeed JSON config for the Trainer", sweepable=False),
    "device": Option(
        _str,
        None,
        "'cpu' to train and evaluate on the CPU with a GPU present (default: the GPU)",
        sweepable=False,
    ),
    "cache_dir": Option(
        _str, "results/cache", "where the embedded demo caches its model", sweepable=False
    ),
    "overwrite": Option(
        _bool, False, "replace an existing --output (at the end)", switch=True, sweepable=False
    ),
    "resume": Option(
        _bool,
        False,
        "continue an interrupted run from its last checkpoint",
        switch=True,
        sweepable=False,
    ),
    "sweep": Option(
        _sweep,
        {},
        "one run per value, one table: e.g. gamma=0.5,0.8,0.95 (repeat for a grid)",
        sweepable=False,
        metavar="OPT=V1,V2",
    ),
}
"""Every option, keyed by its YAML name (the flag is ``--`` + the name with ``-``)."""

DEFAULTS: dict[str, Any] = {k: o.default for k, o in OPTIONS.items()}

CHOICES = {
    "space": ("gradient", "update"),
    "prompt_format": ("auto", "chat", "plain"),
    "dtype": ("float32", "bfloat16", "auto"),
}
"""Options with a fixed set of values."""

# Options that only say how a run is carried out, not what it computes: they may differ
# between an interrupted run and its --resume.
NOT_COMPARED = ("resume", "overwrite", "config", "device", "eval_batch_size")

_REPEATABLE = ("param", "sweep")


class _Parser(argparse.ArgumentParser):
    """Command-line errors raise :class:`UsageError`: one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see gru-unlearn --help)")


def parser() -> argparse.ArgumentParser:
    """The command line: every :data:`OPTIONS` entry as a flag, plus ``--config``. Absent
    flags are absent from the namespace (so the YAML file's values stand)."""
    p = _Parser(
        prog="gru-unlearn",
        description="Unlearn a saved Hugging Face model with GRU: forget/retain rows in, the "
        "evaluated and saved model out (report.json, report.md, losses.png).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="a YAML file with the same keys (flags override it)")
    for name, opt in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if opt.switch:
            p.add_argument(flag, dest=name, action="store_true", help=opt.help)
        elif name in _REPEATABLE:
            p.add_argument(flag, dest=name, action="append", metavar=opt.metavar, help=opt.help)
        else:
            p.add_argument(flag, dest=name, metavar=opt.metavar, help=opt.help)
    return p


def _convert(name: str, value: Any, source: str) -> Any:
    opt = OPTIONS[name]
    if value is None:
        return None
    try:
        out = opt.convert(value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: {name}: {e}") from None
    if name in CHOICES and out not in CHOICES[name]:
        raise UsageError(f"{source}: {name} must be one of {', '.join(CHOICES[name])}, got {out!r}")
    return out


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml  # type: ignore[import-untyped]

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path} does not exist: pass the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise UsageError(f"--config {path} is not valid YAML ({where}): fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise UsageError(f"--config {path} must hold a mapping of option: value")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            raise UsageError(
                f"--config {path}: unknown key {key!r}; known keys: {', '.join(OPTIONS)}"
            )
        out[name] = value
    return out


def resolve(
    argv: Sequence[str] | None, defaults: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], set[str]]:
    """The resolved configuration: ``defaults`` (:data:`DEFAULTS`), then ``--config``'s
    keys, then the flags given; every value converted and checked. Returns it and the
    names the user set (in the file or as flags). Raises :class:`UsageError`."""
    ns = vars(parser().parse_args(argv))
    config_path = ns.pop("config", None)
    cfg = dict(DEFAULTS if defaults is None else defaults)
    given: set[str] = set()
    if config_path is not None:
        for name, value in _load_yaml(config_path).items():
            cfg[name] = _convert(name, value, f"--config {config_path}")
            given.add(name)
    for name, value in ns.items():
        if name in _REPEATABLE and isinstance(value, list) and name in given:
            value = {**cfg[name], **OPTIONS[name].convert(value)}
        cfg[name] = _convert(name, value, "--" + name.replace("_", "-"))
        given.add(name)
    for name, values in cfg["sweep"].items():
        if name not in OPTIONS or not OPTIONS[name].sweepable:
            sweepable = [k for k, o in OPTIONS.items() if o.sweepable]
            raise UsageError(
                f"--sweep {name}: not an option that can be swept; use one of "
                f"{', '.join(sweepable)}"
            )
        cfg["sweep"][name] = [_convert(name, v, f"--sweep {name}") for v in values]
        if len(set(map(repr, cfg["sweep"][name]))) != len(values):
            raise UsageError(f"--sweep {name}: a value is repeated; give each once")
    return cfg, given


def run_name(changes: Mapping[str, Any]) -> str:
    """A sweep run's name (and folder): ``gamma=0.5``, ``GRU`` or ``plain``
    (``no_gru``), joined by commas."""

    def fmt(v: Any) -> str:
        return (
            str(v).lower() if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) else str(v)
        )

    return ",".join(
        ("plain" if v else "GRU") if k == "no_gru" else f"{k}={fmt(v)}" for k, v in changes.items()
    )


def sweep_runs(cfg: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, configuration)`` of every run of the sweep (the grid of the swept values,
    in the order given); one unnamed run (``""``) without a sweep."""
    sweep: dict[str, list[Any]] = cfg["sweep"]
    base = {k: v for k, v in cfg.items() if k != "sweep"}
    if not sweep:
        return [("", base)]
    keys = list(sweep)
    runs = []
    for values in itertools.product(*(sweep[k] for k in keys)):
        changes = dict(zip(keys, values))
        runs.append((run_name(changes), {**base, **changes}))
    return runs
