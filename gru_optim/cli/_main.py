"""The ``gru-unlearn`` command: validate everything, evaluate the model, unlearn (each run
of a sweep), evaluate and save each result, then move the whole result into place."""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._config import NOT_COMPARED, UsageError, resolve, sweep_runs

__all__ = ["main", "unlearn"]

PARTIAL = ".{}.partial"
"""The working directory beside ``--output`` (its name formatted in): every result is
written there and the directory is renamed to ``--output`` at the very end."""


def _jsonable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(dict(cfg), default=str))
    return out


def _write_yaml(path: Path, data: Mapping[str, Any]) -> None:
    import yaml  # type: ignore[import-untyped]

    path.write_text(yaml.safe_dump(_jsonable(data), sort_keys=False), encoding="utf-8")


def _check_gru_options(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Every run's GRU options as :class:`~gru_optim.GRUOptimizer` checks them (the one
    place that decides what is valid), and its objective as the registry knows it."""
    import torch

    from .. import GRUOptimizer
    from ..objectives import get_objective

    param = torch.zeros(1, requires_grad=True)
    for name, rc in runs:
        where = f" (sweep run {name})" if name else ""
        try:
            objective = get_objective(rc["method"], **rc["param"])
        except KeyError as e:
            raise UsageError(f"--method: {e.args[0]}{where}") from None
        except TypeError as e:
            raise UsageError(f"--param: {e}{where}: pass only the objective's own") from None
        if objective.uses_idk:
            raise UsageError(
                f"--method {rc['method']} trains on 'I don't know' answers, which gru-unlearn "
                "does not take: choose another method, or use GRUTrainer with "
                "PairedUnlearningDataset(idk=...)"
            )
        for key in ("batch_size", "grad_accum", "max_length", "eval_batch_size"):
            if rc[key] < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {rc[key]}{where}")
        if rc["lr"] <= 0:
            raise UsageError(f"--lr must be > 0, got {rc['lr']}{where}")
        if rc["no_gru"]:
            continue
        try:
            GRUOptimizer(
                torch.optim.SGD([param], lr=0.1),
                gamma=rc["gamma"],
                directions=rc["directions"],
                space=rc["space"],
                cos_clip=rc["cos_clip"],
            )
        except (TypeError, ValueError) as e:
            raise UsageError(f"{e}{where}") from None


def _read_sets(cfg: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    from ..data import RowsError, RowsOverlapWarning, read_rows, row_kind, shared_rows

    sets: dict[str, list[dict[str, Any]]] = {}
    for name in ("forget", "retain", "holdout"):
        path = cfg[name]
        if path is None:
            continue
        try:
            rows = read_rows(path)
            row_kind(rows, f"--{name} {path}")
        except RowsError as e:
            raise UsageError(str(e)) from None
        sets[name] = rows
    kinds = {n: row_kind(r, n) for n, r in sets.items()}
    if len(set(kinds.values())) > 1:
        raise UsageError(
            "the files mix question/answer rows and text rows ("
            + ", ".join(f"{n}: {k}" for n, k in kinds.items())
            + "): give every file the same columns"
        )
    shared = shared_rows(sets["forget"], sets["retain"])
    if shared:
        warnings.warn(
            RowsOverlapWarning(
                f"{len(shared)} of the {len(sets['forget'])} forget rows also appear in the retain "
                f"rows (forget rows {', '.join(map(str, shared[:5]))}"
                f"{', ...' if len(shared) > 5 else ''}): remove them from --retain"
            ),
            stacklevel=2,
        )
    return sets


def _prepare_output(cfg: Mapping[str, Any]) -> tuple[Path, Path]:
    out = Path(cfg["output"])
    partial = out.parent / PARTIAL.format(out.name)
    if out.exists() and not cfg["overwrite"]:
        raise UsageError(
            f"--output {out} exists: pass --overwrite to replace it when the run completes, "
            "or choose another directory"
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} is a file: choose a directory")
    if partial.exists() and not cfg["resume"]:
        raise UsageError(
            f"an interrupted run left {partial}: pass --resume to continue it, or delete it"
        )
    if cfg["resume"] and not partial.exists():
        raise UsageError(f"nothing to resume ({partial} does not exist): run without --resume")
    if cfg["resume"]:
        import yaml

        saved = yaml.safe_load((partial / "config.yaml").read_text(encoding="utf-8"))
        now = _jsonable(cfg)
        diff = [k for k in now if k not in NOT_COMPARED and saved.get(k) != now.get(k)]
        if diff:
            raise UsageError(
                f"--resume: the interrupted run had other options ({', '.join(diff)}): rerun "
                f"it with the options of {partial / 'config.yaml'}"
            )
    return out, partial


def _configure(argv: Sequence[str] | None) -> dict[str, Any]:
    cfg, given = resolve(argv)
    if cfg["model"] is None:
        from ._default import DEMO_SETTINGS

        named = [f"--{n}" for n in ("forget", "retain", "holdout") if cfg[n] is not None]
        if named:
            raise UsageError(f"{', '.join(named)} need --model: the model to unlearn from")
        for key, value in DEMO_SETTINGS.items():
            if key not in given:
                cfg[key] = value
        if "sweep" not in given:
            cfg["sweep"] = {"no_gru": [False, True]}
    else:
        missing = [f"--{n}" for n in ("forget", "retain") if cfg[n] is None]
        if missing:
            raise UsageError(f"{' and '.join(missing)} required: the rows to forget and to keep")
        if cfg["output"] is None:
            raise UsageError("--output is required: the directory to save the result in")
    if cfg["steps"] is not None and cfg["epochs"] is not None:
        raise UsageError("give --steps or --epochs, not both")
    if cfg["device"] is not None:
        import torch

        try:
            torch.device(cfg["device"])
        except RuntimeError:
            raise UsageError(
                f"--device {cfg['device']!r} is not a device: use cpu or cuda"
            ) from None
    return cfg


def _evaluate(model: Any, tok: Any, sets: Any, cfg: Mapping[str, Any], desc: str) -> Any:
    from ._evaluate import evaluate

    return evaluate(
        model,
        tok,
        sets,
        batch_size=cfg["eval_batch_size"],
        gen_max_length=cfg["gen_max_length"],
        desc=desc,
    )


def _one_run(
    name: str,
    rc: Mapping[str, Any],
    run_dir: Path,
    model: Any,
    tok: Any,
    sets: Mapping[str, list[dict[str, Any]]],
    eval_sets: Any,
    before: Mapping[str, Any],
    callbacks: Sequence[Any],
) -> dict[str, Any]:
    from transformers import set_seed

    from ..data import qa_paired_dataset
    from ._report import loss_curves, plot_losses, run_table
    from ._train import env_rank, load_model, train_run

    run_dir.mkdir(parents=True, exist_ok=True)
    if name:  # a sweep's run: its own resolved options (the sweep's are one level up)
        _write_yaml(run_dir / "config.yaml", rc)
    set_seed(rc["seed"])  # the LoRA initialisation
    train_set = qa_paired_dataset(
        tok,
        sets["forget"],
        sets["retain"],
        prompt_format=rc["prompt_format"],
        max_length=rc["max_length"],
        seed=rc["seed"],
    )
    t0 = time.perf_counter()
    trainer, trained, history = train_run(
        rc, model, tok, train_set, run_dir, desc=f"unlearn {name}".strip(), callbacks=callbacks
    )
    seconds = time.perf_counter() - t0
    if env_rank() != 0:
        return {}
    if rc["deepspeed"] is not None and rc["lora"] is None:
        trainer.save_model(str(run_dir))  # gathers ZeRO-3 partitions
    else:
        trained.save_pretrained(run_dir)
    tok.save_pretrained(run_dir)
    for leftover in ("checkpoints", "training_args.bin"):
        path = run_dir / leftover
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    device = next(trained.parameters()).device
    del trainer, trained
    # the reported numbers are those of the saved model, reloaded
    saved = load_model(str(run_dir), rc["dtype"]).to(device)
    after = _evaluate(saved, tok, eval_sets, rc, f"evaluate after {name}".strip())
    curves = loss_curves(history)
    report = {
        "before": dict(before),
        "after": after,
        "config": _jsonable(rc),
        "train": {
            "steps": max((s for s, _ in curves["forget"]), default=0),
            "seconds": seconds,
            "losses": curves,
        },
    }
    plot_losses(curves, run_dir / "losses.png", f"gru-unlearn {name}".strip())
    (run_dir / "report.md").write_text(run_table(report), encoding="utf-8")
    # written last: a run folder with report.json is complete
    (run_dir / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def unlearn(argv: Sequence[str] | None = None, *, callbacks: Sequence[Any] = ()) -> Path:
    """Run ``gru-unlearn`` with the arguments ``argv``: returns the output directory.
    ``callbacks`` (``transformers.TrainerCallback``) go to every run's Trainer. Raises
    :class:`UsageError` for bad input, before anything is written."""
    from ._evaluate import build_eval_sets
    from ._report import sweep_table
    from ._train import env_rank, eval_device, load_model, load_tokenizer

    cfg = _configure(argv)
    runs = sweep_runs(cfg)
    _check_gru_options(runs)
    out, partial = _prepare_output(cfg)
    if cfg["model"] is None:  # the embedded demo: built (once, cached) after validation
        import torch

        from ._default import DEMO_THREADS, prepare_demo

        torch.set_num_threads(DEMO_THREADS)
        cfg.update(prepare_demo(cfg["cache_dir"]))
        runs = sweep_runs(cfg)
    sets = _read_sets(cfg)
    tok = load_tokenizer(cfg["model"])
    model = load_model(cfg["model"], cfg["dtype"]).to(eval_device(cfg["device"]))
    try:
        eval_sets = build_eval_sets(
            tok, sets, prompt_format=cfg["prompt_format"], max_length=cfg["max_length"]
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    main = env_rank() == 0
    if main:
        partial.mkdir(parents=True, exist_ok=True)
        _write_yaml(partial / "config.yaml", cfg)
    before_path = partial / "before.json"
    if before_path.exists():
        before = json.loads(before_path.read_text(encoding="utf-8"))
    else:
        before = _evaluate(model, tok, eval_sets, cfg, "evaluate before")
        if main:
            before_path.write_text(json.dumps(before, indent=1), encoding="utf-8")
    reports: list[tuple[str, dict[str, Any]]] = []
    for i, (name, rc) in enumerate(runs):
        run_dir = partial / name if name else partial
        done = run_dir / "report.json"
        if done.exists():  # completed before an interruption
            reports.append((name, json.loads(done.read_text(encoding="utf-8"))))
            continue
        if i > 0 or model is None:  # each run starts from the saved model
            model = load_model(cfg["model"], cfg["dtype"])
        reports.append(
            (name, _one_run(name, rc, run_dir, model, tok, sets, eval_sets, before, callbacks))
        )
        model = None
    if not main:
        return out
    if cfg["sweep"]:
        table = sweep_table(before, reports)
        (partial / "sweep.md").write_text(table, encoding="utf-8")
        sweep = {"before": before, "runs": {n: r["after"] for n, r in reports}}
        (partial / "sweep.json").write_text(json.dumps(sweep, indent=1), encoding="utf-8")
    before_path.unlink()
    if out.exists():  # --overwrite: the old result is replaced only now
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old)
    else:
        partial.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: returns the exit status (0; 2 for bad input, with one line
    naming the fix; 130 when interrupted)."""
    from ..data import RowsOverlapWarning

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            shown = warnings.showwarning

            def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
                if issubclass(category, RowsOverlapWarning):
                    print(f"gru-unlearn: warning: {message}", file=sys.stderr)
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            warnings.simplefilter("always", RowsOverlapWarning)  # a line, never an error
            out = unlearn(argv)
    except UsageError as e:
        print(f"gru-unlearn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "gru-unlearn: interrupted: no result was written; run the same command with "
            "--resume to continue from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    table = out / "sweep.md" if (out / "sweep.md").exists() else out / "report.md"
    print(table.read_text(encoding="utf-8"))
    print(
        f"Saved to {out} (report.json, {table.name}, losses.png); wall time "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return 0
