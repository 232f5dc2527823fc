"""``gru-unlearn`` end to end on a tiny GPT-2 saved to a temporary directory, with the
JSONL files the tests write (real ``transformers`` models, tokenizer and Trainer; nothing
mocked). Runs are a few steps on a 2-layer, hidden-32 model with short generations."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny_models import FIRST, author_facts, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from gru_optim.cli import UsageError, main, unlearn
from gru_optim.data import (
    PairedUnlearningDataset,
    RowsError,
    RowsOverlapWarning,
    encode_example,
    encode_qa_rows,
    qa_paired_dataset,
    read_rows,
)
from gru_optim.hf import mean_answer_nll

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny models run fastest on one thread (and a shared machine stays responsive)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def qa_rows(names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        for q, a in author_facts(name, FIRST.index(name)):
            wrong = [a.replace(name, FIRST[(FIRST.index(name) + 5) % 12]), a[:-1] + " too."]
            rows.append({"question": q, "answer": a, "perturbed_answer": wrong})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny GPT-2 with its tokenizer, and forget/retain/holdout JSONL files."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("gpt2").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    write_jsonl(root / "forget.jsonl", qa_rows(FIRST[:2]))
    write_jsonl(root / "retain.jsonl", qa_rows(FIRST[2:6]))
    write_jsonl(root / "holdout.jsonl", qa_rows(FIRST[8:10]))
    return root


def args(root: Path, out: Path, *extra: str, holdout: bool = False) -> list[str]:
    """A fast run: 4 steps, batch 2, generations to 40 tokens."""
    a = [
        "--model", str(root / "model"),
        "--forget", str(root / "forget.jsonl"),
        "--retain", str(root / "retain.jsonl"),
        "--output", str(out),
        "--steps", "4",
        "--lr", "5e-3",
        "--batch-size", "2",
        "--gen-max-length", "40",
        "--eval-batch-size", "32",
        "--save-steps", "2",
        "--device", "cpu",
    ]  # fmt: skip
    if holdout:
        a += ["--holdout", str(root / "holdout.jsonl")]
    return a + list(extra)


def report(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    return data


def state(out: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(out)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- data helpers
def test_encode_qa_rows_matches_encode_example_and_masks_the_prompt() -> None:
    tok = tiny_tokenizer()
    rows = [{"question": "Where was Alba born?", "answer": "Alba was born in Oslo."}]
    (ex,) = encode_qa_rows(tok, rows)
    assert ex == encode_example(
        tok, "Question: Where was Alba born?\nAnswer:", " Alba was born in Oslo."
    )
    assert ex["input_ids"][-1] == tok.eos_token_id
    (text,) = encode_qa_rows(tok, [{"text": "Alba writes poetry."}])
    assert text["labels"] == text["input_ids"] and text["input_ids"][-1] == tok.eos_token_id
    ds = qa_paired_dataset(tok, qa_rows(FIRST[:2]), qa_rows(FIRST[2:4]), seed=3, rank=0)
    assert isinstance(ds, PairedUnlearningDataset) and len(ds) == 6
    assert set(ds[0]) == {"forget", "retain"}


def test_encode_qa_rows_uses_the_chat_template_when_there_is_one() -> None:
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<eos>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (ex,) = encode_qa_rows(tok, [{"question": "Who?", "answer": "Nobody."}])
    n_prompt = ex["labels"].count(-100)
    assert tok.decode(ex["input_ids"][:n_prompt]) == "<user>Who?<assistant>"
    assert tok.decode(ex["labels"][n_prompt:]) == "Nobody.<eos>"
    (plain,) = encode_qa_rows(
        tok, [{"question": "Who?", "answer": "Nobody."}], prompt_format="plain"
    )
    assert tok.decode(plain["input_ids"]).startswith("Question: Who?\nAnswer: Nobody.")


def test_read_rows_reads_every_format(tmp_path: Path) -> None:
    import datasets  # the cli extra installs it (make test's set-up too)

    rows = qa_rows(FIRST[:1])
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with open(tmp_path / "a.csv", "w", encoding="utf-8") as f:
        f.write("question,answer,perturbed_answer\n")
        import csv

        w = csv.writer(f)
        for r in rows:
            w.writerow([r["question"], r["answer"], json.dumps(r["perturbed_answer"])])
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "saved"):
        assert read_rows(tmp_path / name) == rows, name
    assert encode_qa_rows(tiny_tokenizer(), ds) == encode_qa_rows(tiny_tokenizer(), rows)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RowsError, match="no rows"):
        read_rows(tmp_path / "empty.jsonl")
    with pytest.raises(RowsError, match="raise max_length"):
        encode_qa_rows(tiny_tokenizer(), rows, max_length=4)
    with pytest.raises(RowsError, match="'answer' column"):
        encode_qa_rows(tiny_tokenizer(), [{"question": "Who?"}], name="forget")


# ---------------------------------------------------------------- end to end
def test_gru_run_saves_a_model_that_reloads_with_the_reported_numbers(
    workdir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main(args(workdir, out, holdout=True)) == 0
    rep = report(out)
    assert set(rep) >= {"before", "after", "config"}
    for when in ("before", "after"):
        assert set(rep[when]) == {"forget", "retain", "holdout"}
        for s in ("forget", "retain", "holdout"):
            assert {"nll", "prob", "rouge_l", "truth_ratio"} <= set(rep[when][s])
        assert 0.0 <= rep[when]["forget"]["mia_minkpp_auc"] <= 1.0
    assert rep["config"]["no_gru"] is False and rep["config"]["gamma"] == 0.8
    assert rep["after"]["forget"]["nll"] > rep["before"]["forget"]["nll"]  # NPO unlearns
    for name in ("report.md", "losses.png", "config.yaml", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    assert not list(tmp_path.glob(".*partial"))
    assert "| forget | nll |" in (out / "report.md").read_text()
    assert len(rep["train"]["losses"]["retain"]) == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    for s in ("forget", "retain"):
        ex = encode_qa_rows(tok, read_rows(workdir / f"{s}.jsonl"))
        nll = mean_answer_nll(model, ex, tok.pad_token_id)
        assert nll == pytest.approx(rep["after"][s]["nll"], rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    ex = encode_qa_rows(tok, read_rows(workdir / "forget.jsonl"))
    assert mean_answer_nll(base, ex, tok.pad_token_id) == pytest.approx(
        rep["before"]["forget"]["nll"], rel=1e-5
    )


def test_no_gru_baseline_and_lora(workdir: Path, tmp_path: Path) -> None:
    plain = unlearn(args(workdir, tmp_path / "plain", "--no-gru"))
    gru = unlearn(args(workdir, tmp_path / "gru"))
    rp, rg = report(plain), report(gru)
    assert rp["config"]["no_gru"] is True
    assert rp["before"] == rg["before"]
    assert rp["after"]["forget"]["nll"] != rg["after"]["forget"]["nll"]
    assert rp["after"]["forget"]["nll"] > rp["before"]["forget"]["nll"]
    lora = unlearn(args(workdir, tmp_path / "lora", "--lora", "4", "--method", "ga"))
    rl = report(lora)
    assert rl["after"]["forget"]["nll"] > rl["before"]["forget"]["nll"]
    saved = state(lora)
    assert not any("lora" in k for k in saved)  # merged into the base weights
    base = state(workdir / "model")
    assert set(saved) == set(base)
    assert not torch.equal(
        saved["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"]
    )


def test_config_file_equals_flags(workdir: Path, tmp_path: Path) -> None:
    flags = unlearn(args(workdir, tmp_path / "flags", "--gamma", "0.5", "--param", "beta=0.2"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model: {workdir / 'model'}\nforget: {workdir / 'forget.jsonl'}\n"
        f"retain: {workdir / 'retain.jsonl'}\nsteps: 4\nlr: 5.0e-3\nbatch-size: 2\n"
        "gen_max_length: 40\neval_batch_size: 32\nsave_steps: 2\ndevice: cpu\n"
        "gamma: 0.5\nparam: {beta: 0.2}\nlr_unused_typo_guard: null\n"
    )
    with pytest.raises(UsageError, match="unknown key 'lr_unused_typo_guard'"):
        unlearn(["--config", str(cfg), "--output", str(tmp_path / "x")])
    cfg.write_text(
        cfg.read_text()
        .replace("lr_unused_typo_guard: null\n", "gamma: 0.9\n", 1)
        .replace("gamma: 0.5\n", "")
    )
    yaml_out = unlearn(["--config", str(cfg), "--gamma", "0.5", "--output", str(tmp_path / "yaml")])
    a, b = report(flags), report(yaml_out)
    assert a["config"] == {**b["config"], "output": a["config"]["output"]}
    assert a["after"] == b["after"]
    assert (yaml_out / "config.yaml").read_text().count("gamma: 0.5") == 1
    # the resolved configuration written with the results repeats the run exactly
    again = unlearn(
        ["--config", str(yaml_out / "config.yaml"), "--output", str(tmp_path / "again")]
    )
    assert report(again)["after"] == b["after"]


def test_sweep_writes_one_table_and_one_model_per_value(workdir: Path, tmp_path: Path) -> None:
    out = unlearn(args(workdir, tmp_path / "sweep", "--sweep", "gamma=0.5,1.0", "--steps", "2"))
    table = (out / "sweep.md").read_text()
    assert "| before |" in table and "| gamma=0.5 |" in table and "| gamma=1 |" in table
    sweep = json.loads((out / "sweep.json").read_text())
    assert list(sweep["runs"]) == ["gamma=0.5", "gamma=1"]
    for name, gamma in (("gamma=0.5", 0.5), ("gamma=1", 1.0)):
        assert report(out / name)["config"]["gamma"] == gamma
        assert report(out / name)["after"] == sweep["runs"][name]
        AutoModelForCausalLM.from_pretrained(out / name)
    assert sweep["runs"]["gamma=0.5"] != sweep["runs"]["gamma=1"]


# ---------------------------------------------------------------- bad input
def _bad(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gru-unlearn: error: "), err
    assert match in err[0], err[0]


def test_bad_input_is_one_line_a_nonzero_exit_and_nothing_written(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    no_answer = write_jsonl(tmp_path / "noanswer.jsonl", [{"question": "Who?"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_tok = tmp_path / "notok"
    tiny_model("gpt2").save_pretrained(no_tok)
    a = args(workdir, out)
    _bad(capsys, a + ["--forget", str(no_answer)], "no 'answer' column")
    _bad(capsys, a + ["--retain", str(empty)], "has no rows")
    _bad(capsys, a + ["--method", "npx"], "unknown objective 'npx'")
    _bad(capsys, a + ["--model", str(no_tok)], "has no tokenizer")
    _bad(capsys, a + ["--model", "nobody/no-such-model"], "never downloads")
    _bad(capsys, a + ["--gamma", "1.5"], "gamma")
    _bad(capsys, a + ["--steps", "2", "--epochs", "1"], "not both")
    _bad(capsys, a + ["--sweep", "model=a,b"], "not an option that can be swept")
    _bad(capsys, a + ["--resume"], "nothing to resume")
    _bad(capsys, a + ["--no-such-flag"], "unrecognized arguments: --no-such-flag")
    _bad(capsys, a[:2] + a[6:], "--retain required")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "noanswer.jsonl", "notok"]
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    _bad(capsys, a, "pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not list(tmp_path.glob(".*partial"))


def test_forget_retain_overlap_warns(
    workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    retain = write_jsonl(tmp_path / "retain.jsonl", qa_rows(FIRST[1:4]))
    with pytest.warns(RowsOverlapWarning, match="3 of the 6 forget rows also appear"):
        unlearn(args(workdir, tmp_path / "a", "--retain", str(retain), "--steps", "1"))
    capsys.readouterr()
    assert main(args(workdir, tmp_path / "b", "--retain", str(retain), "--steps", "1")) == 0
    err = capsys.readouterr().err
    assert "gru-unlearn: warning: 3 of the 6 forget rows" in err and "remove them" in err


def test_overwrite_replaces_the_output_only_at_the_end(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    unlearn(args(workdir, out, "--overwrite", "--steps", "1"))
    assert not (out / "old.txt").exists() and (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Interrupt(TrainerCallback):  # type: ignore[misc]
    """Ctrl-C (``KeyboardInterrupt``) after optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_leaves_nothing_complete_and_resume_equals_uninterrupted(
    workdir: Path, tmp_path: Path
) -> None:
    full = unlearn(args(workdir, tmp_path / "full", holdout=True))
    out = tmp_path / "out"
    a = args(workdir, out, holdout=True)
    with pytest.raises(KeyboardInterrupt):
        unlearn(a, callbacks=[_Interrupt(3)])
    assert not out.exists()
    partial = tmp_path / ".out.partial"
    assert not list(partial.rglob("report.json")) and not (partial / "model.safetensors").exists()
    with pytest.raises(UsageError, match="pass --resume"):
        unlearn(a)
    with pytest.raises(UsageError, match=r"other options \(gamma\)"):
        unlearn(a + ["--resume", "--gamma", "0.5"])
    unlearn(a + ["--resume"])
    assert not partial.exists()
    assert report(out)["after"] == report(full)["after"]
    s_full, s_out = state(full), state(out)
    for k in s_full:
        torch.testing.assert_close(s_out[k], s_full[k], rtol=0, atol=0, msg=k)


def test_ctrl_c_in_a_real_process_exits_130_and_leaves_no_output(
    workdir: Path, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT) mid-training in a real ``python -m gru_optim.cli`` process. A killed
    process (SIGKILL) runs no code at all after the signal, so it leaves the same state:
    results only ever reach ``--output`` by the final rename."""
    out = tmp_path / "out"
    err = tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gru_optim.cli", *args(workdir, out, "--steps", "400")],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        partial = tmp_path / ".out.partial"
        try:
            deadline = time.monotonic() + 120
            while not list(partial.glob("checkpoints/checkpoint-*")):
                assert proc.poll() is None, "the run ended before it was interrupted"
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err.read_text()
    # on a line of its own: the progress bar is closed before the message
    said = [line for line in text.splitlines() if "gru-unlearn:" in line]
    assert len(said) == 1 and said[0].startswith("gru-unlearn: interrupted"), repr(text[-2000:])
    assert "--resume" in said[0]
    assert not out.exists() and partial.is_dir()
    assert not list(partial.rglob("report.json"))
    shutil.rmtree(partial)


def test_text_rows_train_on_every_token(workdir: Path, tmp_path: Path) -> None:
    def texts(names: list[str]) -> list[dict[str, str]]:
        return [{"text": f"{q} {a}"} for n in names for q, a in author_facts(n, FIRST.index(n))]

    forget = write_jsonl(tmp_path / "f.jsonl", texts(FIRST[:2]))
    retain = write_jsonl(tmp_path / "r.jsonl", texts(FIRST[2:6]))
    out = unlearn(
        args(
            workdir,
            tmp_path / "out",
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--steps",
            "2",
        )
    )
    rep = report(out)
    assert set(rep["after"]["forget"]) == {"nll", "prob", "rouge_l"}  # no truth ratio
    tok = tiny_tokenizer()
    ex = encode_qa_rows(tok, read_rows(forget))
    assert all(e["labels"] == e["input_ids"] for e in ex)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert mean_answer_nll(model, ex, tok.pad_token_id) == pytest.approx(
        rep["after"]["forget"]["nll"], rel=1e-5
    )
    mixed = write_jsonl(tmp_path / "m.jsonl", qa_rows(FIRST[2:3]))
    with pytest.raises(UsageError, match="mix question/answer rows and text rows"):
        unlearn(args(workdir, tmp_path / "out2", "--forget", str(forget), "--retain", str(mixed)))
