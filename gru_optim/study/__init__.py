"""A reproducible unlearning study: GRU against plain unlearning on a TOFU-like corpus.

Everything is built here: a seeded TOFU-like corpus in TOFU's file layout, a byte-level
BPE tokenizer (``tokenizers``), tiny GPT-2 models trained from scratch (``transformers``:
the target memorises the corpus, the oracles see the retain split only), unlearning runs
of GA, GradDiff, GradDiff-KL, NPO, SimNPO, WGA and IdK-DPO, each plain and with every
variant of :class:`gru_optim.GRUOptimizer` (GRU, GRU-k, update space, cos clip, +KL), and
the metrics as TOFU, MUSE and open-unlearning define them. A folder of real TOFU files and
Hugging Face models go through the same code. Needs the ``study`` extra
(``pip install gru-optim[study]``).

Run ``python -m gru_optim.demo`` (the ``demo`` preset) or
``python -m gru_optim.demo --preset full``.
"""

from ._corpus import CorpusConfig, TofuData, generate_corpus, load_tofu, write_corpus
from ._lm import (
    PROMPT_FORMATS,
    Codec,
    EncodedBatch,
    ModelConfig,
    TrainConfig,
    build_model,
    encode_qa,
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
from ._report import (
    compare_fronts,
    hypervolume,
    markdown_table,
    noise_floor,
    pareto_table,
    report_from_dir,
    verdict,
    write_report,
)
from ._runner import ARMS, METHOD_ARMS, METHODS, PRESETS, StudyConfig, run_study, unlearn

__all__ = [
    "ARMS",
    "METHODS",
    "METHOD_ARMS",
    "PRESETS",
    "PROMPT_FORMATS",
    "Codec",
    "CorpusConfig",
    "EncodedBatch",
    "Evaluator",
    "ModelConfig",
    "StudyConfig",
    "TofuData",
    "TrainConfig",
    "build_model",
    "compare_fronts",
    "encode_qa",
    "forget_quality",
    "forget_truth_ratio",
    "generate_corpus",
    "harmonic_mean",
    "hypervolume",
    "load_pretrained",
    "load_tofu",
    "markdown_table",
    "mia_auc",
    "min_k",
    "min_k_plus_plus",
    "noise_floor",
    "option_probability",
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
