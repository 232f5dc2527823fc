"""``make demo``: a real unlearning study end to end, every GRU variant against plain
unlearning.

``python -m gru_optim.demo`` runs the ``demo`` preset (about two minutes on two CPU
cores); ``--preset full`` and ``--preset large`` the studies behind ``docs/results/``
(resumable: runs already saved in the output folder are skipped, so ``--seeds`` or
``--methods`` subsets can be run one after another into the same ``--out``);
``--preset tofu`` with ``--data-dir``, ``--model`` and ``--oracle`` the real-TOFU
setting on a GPU. Results go to ``results/<preset>/``; trained models are cached under
``results/cache/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gru_optim.demo", description=__doc__)
    p.add_argument("--preset", default="demo", help="demo (default), full, large or tofu")
    p.add_argument("--out", default=None, help="output folder (default results/<preset>)")
    p.add_argument("--cache-dir", default="results/cache", help="trained-model cache")
    p.add_argument(
        "--data-dir",
        default=None,
        help="a folder in TOFU's file layout instead of the generated corpus (switches the "
        "truth ratio to TOFU's paraphrase reference)",
    )
    p.add_argument("--split", default=None, help="forget01, forget05 or forget10")
    p.add_argument("--model", default=None, help="the target: a Hugging Face model folder or name")
    p.add_argument(
        "--oracle",
        action="append",
        default=None,
        help="a retain-only model (folder or name); repeat for more, the first is the reference",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: --model)")
    p.add_argument("--prompt-format", default=None, help="plain, llama2 or chat")
    p.add_argument("--system-prompt", default=None, help="system prompt of the chat format")
    p.add_argument("--date-string", default=None, help="the date a Llama 3 chat template prints")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--methods", type=_names, default=None, help="comma-separated methods")
    p.add_argument("--arms", type=_names, default=None, help="comma-separated arms")
    p.add_argument("--lrs", type=_floats, default=None, help="comma-separated learning rates")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=None, help="unlearning steps per run")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    p.add_argument("--forget-batch", type=int, default=None, help="forget rows per step")
    p.add_argument("--retain-batch", type=int, default=None, help="retain rows per step")
    p.add_argument("--eval-batch-size", type=int, default=None, help="rows per eval pass")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the table, plot and README of --out from its summary.json",
    )
    return p


_OVERRIDES = {
    "split": "split",
    "tokenizer": "tokenizer_path",
    "prompt_format": "prompt_format",
    "system_prompt": "system_prompt",
    "date_string": "date_string",
    "device": "device",
    "dtype": "dtype",
    "methods": "methods",
    "arms": "arms",
    "lrs": "lrs",
    "seeds": "seeds",
    "steps": "steps",
    "eval_every": "eval_every",
    "forget_batch": "forget_batch",
    "retain_batch": "retain_batch",
    "eval_batch_size": "eval_batch_size",
    "threads": "threads",
}


def config_from_args(args: argparse.Namespace, presets: dict[str, Any]) -> Any:
    """The preset named by ``args.preset`` with the command line's overrides."""
    cfg = presets[args.preset]
    changes: dict[str, Any] = {
        field: getattr(args, name)
        for name, field in _OVERRIDES.items()
        if getattr(args, name) is not None
    }
    if args.data_dir is not None:
        changes.update(data_dir=args.data_dir, truth_reference="paraphrase")
    if args.model is not None:
        changes["model_path"] = args.model
    if args.oracle is not None:
        changes["oracle_paths"] = tuple(args.oracle)
    return dataclasses.replace(cfg, **changes)


def main(argv: list[str] | None = None) -> int:
    """Run a preset, print its table, the plot's path, a one-sentence verdict and the wall
    time. Returns the exit status."""
    t0 = time.perf_counter()
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        from .study import PRESETS, markdown_table, run_study, verdict
        from .study._config import arms_of
    except ImportError as e:  # pragma: no cover - missing extra
        print(
            f"the study needs the 'study' extra: pip install -e '.[study]' ({e})",
            file=sys.stderr,
        )
        return 2
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    out = Path(args.out or f"results/{args.preset}")
    if args.report_only:
        from .study import report_from_dir

        paths = report_from_dir(out)
        print(paths["table"].read_text())
        print(f"Plot: {paths['plot']}")
        return 0
    if args.preset == "tofu" and (args.data_dir is None or args.model is None):
        parser.error("the tofu preset needs --data-dir (TOFU's files), --model and --oracle")
    try:
        cfg = config_from_args(args, PRESETS)
    except ValueError as e:
        parser.error(str(e))
    runs = cfg.runs()
    print(
        f"GRU unlearning study, preset '{cfg.name}': {len(runs)} runs of {cfg.steps} steps "
        f"({len(cfg.lrs)} lr x {len(cfg.seeds)} seed(s)); arms per method: "
        + "; ".join(f"{m}: {', '.join(arms_of(m, cfg.arms))}" for m in cfg.methods)
    )
    if cfg.name == "demo":
        print(
            "(the demo preset runs two methods and three arms; `--preset full` runs GA, "
            "GradDiff, GradDiff-KL, NPO, NPO+GD, SimNPO, WGA and IdK-DPO with every arm)"
        )
    command = "python -m gru_optim.demo " + " ".join(sys.argv[1:] if argv is None else argv)
    records = run_study(cfg, out_dir=out, cache_dir=args.cache_dir, command=command.strip())
    print()
    print(markdown_table(records, dataclasses.asdict(cfg)))
    print(
        f"Plot: {out / 'tradeoff.png'}  "
        f"(table: {out / 'table.md'}, records: {out / 'summary.json'})"
    )
    print()
    print("Summary: " + verdict(records))
    print(f"Wall time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
