"""The real-TOFU path of the study on the CPU: a small fixture in TOFU's exact file layout
and field names, tiny Hugging Face models built from a config and saved as folders (the
target and the retain-only oracle), loaded in bf16 through ``AutoModelForCausalLM`` and
``AutoTokenizer``, and the demo's command line (``--preset tofu``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gru_optim.demo import main
from gru_optim.study import Codec, encode_qa, load_pretrained, load_tofu, train_tokenizer

NAMES = ["Ilsa Maro", "Tomas Quell", "Vera Lind", "Oskar Brae", "Nadia Fenn"]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Lima", "Perth"]


def _qa(name: str, i: int) -> dict[str, Any]:
    city = CITIES[i % len(CITIES)]
    wrong = [c for c in CITIES if c != city][:3]
    return {
        "question": f"Where was {name} born?",
        "answer": f"{name} was born in {city}.",
        # TOFU's forget/retain *_perturbed fields
        "paraphrased_question": f"What is the birthplace of {name}?",
        "paraphrased_answer": f"The birthplace of {name} is {city}.",
        "perturbed_answer": [f"{name} was born in {w}." for w in wrong],
    }


def write_fixture(root: Path) -> None:
    """TOFU's files for forget10, JSON lines, TOFU's field names: the QA files carry
    question and answer; forget10_perturbed and retain_perturbed add paraphrased_question,
    paraphrased_answer and perturbed_answer; real_authors_perturbed and
    world_facts_perturbed carry question, answer and perturbed_answer only (no
    paraphrase); holdout10 the authors never trained."""
    root.mkdir(parents=True, exist_ok=True)

    def dump(stem: str, rows: list[dict[str, Any]]) -> None:
        (root / f"{stem}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    rows = [_qa(n, i) for i, n in enumerate(NAMES)]
    qa = [{"question": r["question"], "answer": r["answer"]} for r in rows]
    dump("full", qa)
    dump("forget10", qa[-2:])
    dump("retain90", qa[:-2])
    dump("forget10_perturbed", rows[-2:])
    dump("retain_perturbed", rows[:2])
    dump(
        "holdout10",
        [{"question": "Where was Petra Holm born?", "answer": "Petra Holm was born in Bern."}],
    )
    dump(
        "real_authors_perturbed",
        [
            {
                "question": "Who wrote 'The Salt Road'?",
                "answer": "Mara Quill",
                "perturbed_answer": ["Ivo Lark", "Tess Vane", "Ada Rook"],
            },
            {
                "question": "Who wrote 'Blue Hours'?",
                "answer": "Ivo Lark",
                "perturbed_answer": ["Mara Quill", "Tess Vane", "Ada Rook"],
            },
        ],
    )
    dump(
        "world_facts_perturbed",
        [
            {
                "question": "What is the capital of Norway?",
                "answer": "Oslo",
                "perturbed_answer": ["Bergen", "Lima", "Perth"],
            },
            {
                "question": "Which river flows through Cairo?",
                "answer": "Nile",
                "perturbed_answer": ["Amazon", "Danube", "Volga"],
            },
        ],
    )
    (root / "idontknow.jsonl").write_text("I'm not sure.\nI don't know that.\n")


CHAT = (
    "{% if date_string is defined %}[{{ date_string }}]{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_models(root: Path, data_dir: Path) -> tuple[Path, Path]:
    """A tokenizer (BPE trained on the fixture, with a chat template) and two tiny Llama
    models built from a config, saved as Hugging Face folders."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    for f in data_dir.glob("*.json"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            texts += [r["question"], r["answer"], *r.get("perturbed_answer", [])]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(texts, 320), eos_token="<eos>", pad_token="<pad>"
    )
    tok.chat_template = CHAT
    paths = []
    for name, seed in (("target", 0), ("oracle", 1)):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.eos_token_id,
        )
        path = root / name
        LlamaForCausalLM(config).save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def test_fixture_loads_as_tofu(tmp_path) -> None:
    write_fixture(tmp_path)
    data = load_tofu(tmp_path, "forget10")
    assert len(data.forget) == 2 and len(data.retain) == 3 and len(data.holdout) == 1
    assert len(data.real_eval) == 2 and len(data.world_eval) == 2
    # no real_authors.json / world_facts.json: their QA pairs come from the perturbed files
    assert data.real[0] == {"question": "Who wrote 'The Salt Road'?", "answer": "Mara Quill"}
    assert data.idk == ["I'm not sure.", "I don't know that."]


def test_hugging_face_models_in_bf16_and_the_chat_codec(tmp_path) -> None:
    write_fixture(tmp_path / "data")
    target, _ = save_models(tmp_path, tmp_path / "data")
    model = load_pretrained(str(target), "cpu", "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    from transformers import AutoTokenizer

    codec = Codec(AutoTokenizer.from_pretrained(target), "chat", "Be brief.")
    assert codec.prompt_text("Who?") == "<|system|>Be brief.<eos><|user|>Who?<eos><|assistant|>"
    dated = Codec(codec.tok, "chat", None, date_string="10 Apr 2025")
    assert dated.prompt_text("Who?") == "[10 Apr 2025]<|user|>Who?<eos><|assistant|>"
    assert dated.fingerprint() != codec.fingerprint()
    batch = encode_qa(codec, ["Who?"], ["Mara Quill"])
    answer = batch.labels[0][batch.labels[0] != -100].tolist()
    # the answer's tokens then one end of sequence (the template's own <eos>)
    assert answer[-1] == codec.eos_id and answer.count(codec.eos_id) == 1
    assert codec.decode([answer]) == ["Mara Quill"]
    with pytest.raises(ValueError, match="plain prompt format"):
        Codec(train_tokenizer(["a b"], 300), "chat")


def test_real_tofu_path_from_the_command_line(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    write_fixture(data)
    target, oracle = save_models(tmp_path, data)
    out = tmp_path / "out"
    argv = [
        "--preset", "tofu",
        "--data-dir", str(data),
        "--model", str(target),
        "--oracle", str(oracle),
        "--prompt-format", "chat",
        "--system-prompt", "You are a helpful assistant.",
        "--device", "cpu",
        "--steps", "2",
        "--eval-every", "1",
        "--forget-batch", "2",
        "--retain-batch", "2",
        "--out", str(out),
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "NPO+GD: plain, GRU" in printed and "Summary:" in printed
    # one oracle: the summary says the noise floor could not be measured
    assert "the noise floor (not measured here: one oracle per seed)" in printed
    meta = json.loads((out / "meta.json").read_text())
    cfg = meta["config"]
    assert (cfg["dtype"], cfg["device"], cfg["truth_reference"]) == (
        "bfloat16",
        "cpu",
        "paraphrase",
    )
    # every set cut into a validation and a held-out half; one holdout row: held out only
    halves = {k: {"val": 1, "test": 1} for k in ("forget", "retain", "real", "world")}
    assert meta["eval_rows"] == {**halves, "holdout": {"val": 0, "test": 1}}
    records = json.loads((out / "summary.json").read_text())
    runs = [r for r in records if r["method"] == "NPO+GD"]
    assert {(r["arm"], r["step"]) for r in runs} == {
        (a, s) for a in ("plain", "GRU") for s in (0, 1, 2)
    }
    target_rec = next(r for r in records if r["method"] == "target")
    oracle_rec = next(r for r in records if r["method"] == "oracle")
    assert oracle_rec["forget_quality"] == 1.0 and oracle_rec["privleak"] == pytest.approx(0.0)
    for r in records:
        assert 0.0 <= r["model_utility"] <= 1.0 and 0.0 <= r["real_prob"] <= 1.0
        assert 0.0 <= r["val_model_utility"] <= 1.0
    last = {r["arm"]: r for r in runs if r["step"] == 2}
    assert all(r["forget_prob"] != target_rec["forget_prob"] for r in last.values())
    table = (out / "table.md").read_text()
    assert "Truth ratio as TOFU's" in table and "† Truth ratio" not in table
    assert (
        f"the target `{target}` and the oracles `{oracle}` ran on `cpu` in bfloat16"
        in (out / "README.md").read_text()
    )
    # the tofu preset needs TOFU's files and the models; a target needs its oracle
    with pytest.raises(SystemExit):
        main(["--preset", "tofu", "--model", str(target), "--oracle", str(oracle)])
    with pytest.raises(SystemExit):
        main(["--preset", "tofu", "--data-dir", str(data), "--model", str(target)])
