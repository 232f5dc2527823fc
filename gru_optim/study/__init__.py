"""A reproducible unlearning study: GRU against plain unlearning on a TOFU-like corpus.

Everything is built here: a seeded TOFU-like corpus in TOFU's file layout, a byte-level
BPE tokenizer (``tokenizers``), tiny GPT-2 models trained from scratch (``transformers``:
the target memorises the corpus, the oracles see the retain split only), unlearning runs
of GA, GradDiff, NPO, SimNPO and WGA, each plain and with :class:`gru_optim.GRUOptimizer`,
and TOFU/MUSE metrics. Needs the ``study`` extra (``pip install gru-optim[study]``).

Run ``python -m gru_optim.demo`` (the ``demo`` preset) or
``python -m gru_optim.demo --preset full``.
"""

from ._corpus import CorpusConfig, TofuData, generate_corpus, load_tofu, write_corpus
from ._lm import (
    EncodedBatch,
    ModelConfig,
    TrainConfig,
    build_model,
    encode_qa,
    train_tokenizer,
)
from ._metrics import (
    Evaluator,
    forget_quality,
    harmonic_mean,
    mia_auc,
    min_k,
    privleak,
    truth_ratio,
    truth_score,
)
from ._report import (
    hypervolume,
    markdown_table,
    pareto_table,
    report_from_dir,
    verdict,
    write_report,
)
from ._runner import METHODS, PRESETS, StudyConfig, run_study, unlearn

__all__ = [
    "METHODS",
    "PRESETS",
    "CorpusConfig",
    "EncodedBatch",
    "Evaluator",
    "ModelConfig",
    "StudyConfig",
    "TofuData",
    "TrainConfig",
    "build_model",
    "encode_qa",
    "forget_quality",
    "generate_corpus",
    "harmonic_mean",
    "hypervolume",
    "load_tofu",
    "markdown_table",
    "mia_auc",
    "min_k",
    "pareto_table",
    "privleak",
    "report_from_dir",
    "run_study",
    "train_tokenizer",
    "truth_ratio",
    "truth_score",
    "unlearn",
    "verdict",
    "write_corpus",
    "write_report",
]
