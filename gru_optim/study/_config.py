"""What a study is: its methods and arms (:data:`METHODS`, :data:`ARMS`), everything one
study depends on (:class:`StudyConfig`) and the presets (:data:`PRESETS`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._corpus import CorpusConfig
from ._lm import ModelConfig, TrainConfig
from ._metrics import GENERATION_MAX_LENGTH

__all__ = ["ARMS", "METHODS", "METHOD_ARMS", "PRESETS", "StudyConfig", "arms_of"]

METHODS = ("GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "WGA", "IdK-DPO", "NPO+GD")
"""The unlearning methods: gradient ascent; GradDiff (GA + retain NLL); GradDiff-KL, its
``+KL`` form (GA + KL to the target on the retain batch); NPO; SimNPO; WGA; IdK-DPO (DPO
preferring a refusal to the forget answer); NPO+GD (NPO + retain NLL, the paper's
setting)."""

ARMS = ("plain", "GRU", "GRU-k", "update", "cos-clip", "+KL")
"""How a method's gradient is used: ``plain`` (AdamW on the objective); ``GRU``
(``GRUOptimizer(AdamW, gamma)``, the paper's projection against the retain memory);
``GRU-k`` (``directions=4``: the cone of the memory and the 3 most recent retain
gradients); ``update`` (``space="update"``: the inner optimizer's step is rectified);
``cos-clip`` (``cos_clip=-0.5``, the authors' partial projection); ``+KL`` (GradDiff-KL
only: GA rectified against the retain-NLL memory, then the retain KL gradient added
unprojected through ``post_closure``, the authors' ``+KL``)."""

METHOD_ARMS: dict[str, tuple[str, ...]] = {
    m: ("plain", "+KL") if m == "GradDiff-KL" else ARMS[:5] for m in METHODS
}
"""The arms each method runs with: GradDiff-KL is plain or ``+KL``; every other method
plain or with the four rectifications."""


def arms_of(method: str, arms: tuple[str, ...]) -> tuple[str, ...]:
    """The arms of ``arms`` that ``method`` runs with (:data:`METHOD_ARMS`)."""
    return tuple(a for a in METHOD_ARMS[method] if a in arms)


@dataclass(frozen=True)
class StudyConfig:
    """Everything one study depends on.

    ``lrs`` x ``seeds`` x ``methods`` x ``arms`` unlearning runs of ``steps`` steps,
    evaluated every ``eval_every`` steps (and at step 0, the target). A seed is one
    replicate of the whole experiment: its own target (trained from that seed's
    initialisation), its own unlearning batches and, with ``resplit``, its own draw of
    the forget, retain and holdout authors (``CorpusConfig.split_seed``) with its own
    ``n_oracles`` retain-only models (without ``resplit`` every seed shares the split and
    the oracles). The first oracle is the reference of forget quality and privleak; the
    second measures the noise floor. Every evaluation set is cut into a validation half,
    on which learning rate and stopping step are chosen, and a held-out half, which is
    reported.

    With ``model_path`` the target is that Hugging Face model (a folder or a hub name; its
    tokenizer, or ``tokenizer_path``'s, in ``prompt_format`` with ``system_prompt`` and the
    chat template's ``date_string``) and the oracles are
    ``oracle_paths`` (the retain-only models, the first the reference): nothing is
    trained. ``device`` and ``dtype`` say where and in what the models run.
    """

    name: str = "demo"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    split: str = "forget10"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: tuple[str, ...] = ("GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "WGA")
    arms: tuple[str, ...] = ARMS
    lrs: tuple[float, ...] = (1e-3,)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 20
    eval_every: int = 5
    forget_batch: int = 8
    retain_batch: int = 8
    gamma: float = 0.8
    directions: int = 4
    cos_clip: float = -0.5
    n_oracles: int = 2
    resplit: bool = False
    npo_beta: float = 0.1
    simnpo_beta: float = 2.5
    simnpo_delta: float = 0.0
    wga_beta: float = 1.0
    dpo_beta: float = 0.1
    graddiff_alpha: float = 1.0
    kl_alpha: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 0
    truth_reference: str = "answer"
    generation_max_length: int = GENERATION_MAX_LENGTH
    eval_batch_size: int = 128
    threads: int = 1
    data_dir: str | None = None
    model_path: str | None = None
    oracle_paths: tuple[str, ...] = ()
    tokenizer_path: str | None = None
    prompt_format: str = "plain"
    system_prompt: str | None = None
    date_string: str | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
        for a in self.arms:
            if a not in ARMS:
                raise ValueError(f"unknown arm {a!r}; choose from {ARMS}")
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError("steps and eval_every must be >= 1")
        if self.model_path is not None and not self.oracle_paths:
            raise ValueError(
                "model_path needs oracle_paths: forget quality and privleak compare with "
                "the retain-only model"
            )

    def runs(self) -> list[tuple[str, str, float, int]]:
        """Every ``(method, arm, lr, seed)`` of the study, in the order they run."""
        return [
            (method, arm, lr, seed)
            for lr in self.lrs
            for seed in self.seeds
            for method in self.methods
            for arm in arms_of(method, self.arms)
        ]


_TINY = ModelConfig(vocab_size=1024, n_embd=64, n_layer=2, n_head=4)
_LARGE = ModelConfig(vocab_size=1024, n_embd=192, n_layer=3, n_head=6)
_FULL_CORPUS = CorpusConfig(n_authors=40, n_facts=8, n_perturbed=4, n_world=30, seed=0)
_FAST_TRAIN = TrainConfig(epochs=50, batch_size=32, lr=1e-2)

PRESETS: dict[str, StudyConfig] = {
    "demo": StudyConfig(
        name="demo",
        # 30 authors x 10 facts: a 30-row forget set, 15 rows in each half
        corpus=CorpusConfig(n_authors=30, n_facts=10, n_perturbed=3, n_world=20, seed=0),
        model=_TINY,
        train=TrainConfig(epochs=30, batch_size=32, lr=1e-2),
        methods=("GA", "NPO+GD"),
        arms=("plain", "GRU", "update"),
        lrs=(5e-4, 1e-3),
        seeds=(0, 1, 2),
        steps=20,
        eval_every=5,
        n_oracles=2,
        # a collapsed model babbles to the length limit: 80 tokens hold every prompt and
        # answer here and keep the demo fast (the other presets keep TOFU's 200)
        generation_max_length=80,
    ),
    "full": StudyConfig(
        name="full",
        corpus=_FULL_CORPUS,
        model=_TINY,
        train=_FAST_TRAIN,
        methods=("GA", "GradDiff", "GradDiff-KL", "NPO", "NPO+GD", "SimNPO", "WGA", "IdK-DPO"),
        arms=ARMS,
        lrs=(3e-4, 5e-4, 1e-3),
        seeds=(0, 1, 2, 3, 4),
        steps=40,
        eval_every=5,
        n_oracles=2,
        resplit=True,
    ),
    "large": StudyConfig(
        name="large",
        corpus=_FULL_CORPUS,
        model=_LARGE,
        train=TrainConfig(epochs=50, batch_size=32, lr=3e-3),
        methods=("GA", "NPO", "NPO+GD"),
        arms=("plain", "GRU", "update"),
        lrs=(2e-4, 5e-4),
        seeds=(0, 1, 2, 3, 4),
        steps=40,
        eval_every=5,
        n_oracles=2,
        resplit=True,
    ),
    "tofu": StudyConfig(
        name="tofu",
        methods=("NPO+GD",),
        arms=("plain", "GRU"),
        lrs=(1e-5,),
        seeds=(0,),
        steps=120,
        eval_every=20,
        forget_batch=32,
        retain_batch=32,
        weight_decay=0.01,
        warmup_steps=12,
        truth_reference="paraphrase",
        eval_batch_size=16,
        device="cuda",
        dtype="bfloat16",
    ),
}
"""``demo``: the study of ``make demo`` (about two minutes on two CPU cores; two methods,
three arms, three seeds sharing one split); ``full``: every method and arm, five seeds
each with its own split, target and oracles; ``large``: the core comparison (GA, NPO and
NPO+GD; plain, GRU and update-space GRU) on a 1.6M-parameter GPT-2, five seeds;
``tofu``: the real-TOFU setting for a GPU (needs ``data_dir``, ``model_path`` and
``oracle_paths``; 10 epochs of forget10 at batch 32)."""
