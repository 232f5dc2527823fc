"""docs/guides/open_unlearning.md runs: its Python blocks against the Trainer subclasses of
tests/_unlearn_trainers.py (written in open-unlearning's conventions), laid out as
open-unlearning's ``trainer`` package.

The page's blocks are marked ``no-run`` for tests/test_docs.py (which only compiles them):
they import open-unlearning's own modules (``trainer.unlearn.npo``, ...). Here a
``trainer`` package in a temporary directory stands in: its ``__init__`` holds a
``TRAINER_REGISTRY`` and ``_register_trainer`` as open-unlearning's does, followed by the
guide's first block (the lines the guide says to add there); ``trainer.unlearn.<module>``
give the stand-in classes. Then the guide's second block runs, and the YAML block's
``method_args`` must be what the second block says Hydra composes.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "open_unlearning.md"

_REGISTRY = '''\
"""Stand-in for open-unlearning's src/trainer/__init__.py (registry part)."""
from typing import Any, Dict

TRAINER_REGISTRY: Dict[str, Any] = {}


def _register_trainer(trainer_class):
    TRAINER_REGISTRY[trainer_class.__name__] = trainer_class


from _unlearn_trainers import GradDiff, NPO, SimNPO  # noqa: E402

for _cls in (GradDiff, NPO, SimNPO):
    _register_trainer(_cls)

# ---- the lines docs/guides/open_unlearning.md adds ----
'''


def blocks(language: str) -> list[str]:
    text = GUIDE.read_text()
    return [m.group(1) for m in re.finditer(rf"```{language}\n(.*?)```", text, re.S)]


@pytest.fixture
def open_unlearning_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pkg = tmp_path / "trainer"
    (pkg / "unlearn").mkdir(parents=True)
    (pkg / "__init__.py").write_text(_REGISTRY + blocks("python")[0])
    (pkg / "unlearn" / "__init__.py").write_text("")
    for module, name in (("grad_diff", "GradDiff"), ("npo", "NPO"), ("simnpo", "SimNPO")):
        (pkg / "unlearn" / f"{module}.py").write_text(f"from _unlearn_trainers import {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in [m for m in sys.modules if m == "trainer" or m.startswith("trainer.")]:
        del sys.modules[name]


def test_the_guide_has_the_blocks_this_test_runs() -> None:
    assert len(blocks("python")) == 2 and len(blocks("yaml")) == 1
    text = GUIDE.read_text()
    assert text.count("<!-- docs-test: no-run -->\n```python") == 2


def test_the_registration_block_registers_gru_trainers(open_unlearning_layout: Path) -> None:
    import trainer
    from _unlearn_trainers import NPO

    from gru_optim.hf import GRUMixin

    for name in ("GRUNPO", "GRUGradDiff", "GRUSimNPO"):
        cls = trainer.TRAINER_REGISTRY[name]
        assert cls.__name__ == name and issubclass(cls, GRUMixin)
    assert trainer.TRAINER_REGISTRY["GRUNPO"].__mro__[1:3] == (GRUMixin, NPO)


def test_the_config_and_the_cpu_check_run(open_unlearning_layout: Path, capsys: Any) -> None:
    config = yaml.safe_load(blocks("yaml")[0])
    assert config["handler"] == "GRUNPO" and config["defaults"] == ["NPO"]
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(blocks("python")[1]), str(GUIDE), "exec"), namespace)
    # open-unlearning's configs/trainer/NPO.yaml method_args, then GRUNPO.yaml's on top
    npo_defaults = {"beta": 0.1, "alpha": 1.0, "gamma": 1.0, "retain_loss_type": "NLL"}
    assert namespace["method_args"] == {**npo_defaults, **config["method_args"]}
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert type(trainer).__name__ == "GRUNPO"
    out = capsys.readouterr().out
    assert "GRUOptimizer(" in out and "gru_conflict" in out
