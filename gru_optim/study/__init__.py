"""A reproducible unlearning study: GRU against plain unlearning on a TOFU-like corpus.

Everything is built here: a seeded TOFU-like corpus in TOFU's file layout, a byte-level
BPE tokenizer (``tokenizers``), tiny GPT-2 models trained from scratch (``transformers``:
the target memorises the corpus, the oracles see the retain split only), unlearning runs
of GA, GradDiff, GradDiff-KL, NPO, NPO+GD, SimNPO, WGA and IdK-DPO, each plain and with every
variant of :class:`gru_optim.GRUOptimizer` (GRU, GRU-k, update space, cos clip, +KL), and
the metrics as TOFU, MUSE and open-unlearning define them. A folder of real TOFU files and
Hugging Face models go through the same code. Needs the ``study`` extra
(``pip install gru-optim[study]``).

Run ``python -m gru_optim.demo`` (the ``demo`` preset) or
``python -m gru_optim.demo --preset full``.
"""

from ._config import ARMS, METHOD_ARMS, METHODS, PRESETS, StudyConfig
from ._corpus import CorpusConfig, generate_corpus, write_corpus
from ._lm import (
    PROMPT_FORMATS,
    Codec,
    EncodedBatch,
    ModelConfig,
    TrainConfig,
    build_model,
    encode_qa,
    load_or_train,
    load_pretrained,
    train_tokenizer,
)
from ._metrics import (
    Evaluator,
    forget_quality,
    forget_truth_ratio,
    harmonic_mean,
    mia_auc,
    min_k,
    min_k_plus_plus,
    option_probability,
    privleak,
    truth_ratio,
    truth_score,
)
from ._outcomes import (
    FP_LEVELS,
    FQ_LEVEL,
    STATS,
    Comparison,
    comparisons,
    identical_arms,
    noise_floor,
    seed_outcomes,
)
from ._plot import plot_tradeoff
from ._report import markdown_table, report_from_dir, write_report
from ._runner import load_records, run_study
from ._stats import PairedTest, holm, paired_test
from ._tofu import TofuData, load_tofu
from ._trajectory import at_step, crossing, front_area
from ._unlearn import unlearn
from ._verdict import headline, verdict

__all__ = [
    "ARMS",
    "FP_LEVELS",
    "FQ_LEVEL",
    "METHODS",
    "METHOD_ARMS",
    "PRESETS",
    "PROMPT_FORMATS",
    "STATS",
    "Codec",
    "Comparison",
    "CorpusConfig",
    "EncodedBatch",
    "Evaluator",
    "ModelConfig",
    "PairedTest",
    "StudyConfig",
    "TofuData",
    "TrainConfig",
    "at_step",
    "build_model",
    "comparisons",
    "crossing",
    "encode_qa",
    "forget_quality",
    "forget_truth_ratio",
    "front_area",
    "generate_corpus",
    "harmonic_mean",
    "holm",
    "identical_arms",
    "load_or_train",
    "load_pretrained",
    "load_records",
    "load_tofu",
    "markdown_table",
    "mia_auc",
    "min_k",
    "min_k_plus_plus",
    "noise_floor",
    "option_probability",
    "paired_test",
    "plot_tradeoff",
    "privleak",
    "report_from_dir",
    "run_study",
    "seed_outcomes",
    "train_tokenizer",
    "truth_ratio",
    "truth_score",
    "unlearn",
    "headline",
    "verdict",
    "write_corpus",
    "write_report",
]
