"""Objectives against hand-computed values, gradient signs, masking and reductions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gru_optim.objectives import (
    IGNORE_INDEX,
    OBJECTIVES,
    LossInputs,
    ga_kl_loss,
    ga_loss,
    get_objective,
    grad_diff_loss,
    idk_dpo_loss,
    idk_nll_loss,
    nll_loss,
    npo_loss,
    npo_rt_loss,
    retain_kl_loss,
    satimp_loss,
    sequence_nll,
    simnpo_loss,
    simnpo_rt_loss,
    token_counts,
    token_nll,
    wga_loss,
)

LOG3 = math.log(3.0)


def two_class_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary of 2. Logits [0, log 3] give p = (1/4, 3/4).

    Sequence 0: labels [-100, 1, 0] -> answer tokens with p = 3/4 then 1/4.
    Sequence 1: labels [-100, -100, 1] -> one answer token with p = 3/4.
    """
    logits = torch.tensor([[0.0, LOG3]]).repeat(2, 3, 1)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, 1]])
    return logits, labels


NLL_HI = -math.log(0.75)  # NLL of a token with p = 3/4
NLL_LO = -math.log(0.25)  # NLL of a token with p = 1/4


def random_batch(seed: int = 0, b: int = 3, t: int = 6, v: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g)
    ref = logits + 0.5 * torch.randn(b, t, v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :2] = IGNORE_INDEX  # prompt
    labels[0, -1] = IGNORE_INDEX  # padding
    return logits, labels, ref


# ---------------------------------------------------------------- basic quantities
def test_token_nll_sequence_nll_and_counts_by_hand() -> None:
    logits, labels = two_class_batch()
    tok = token_nll(logits, labels)
    assert tok.shape == (2, 2)
    torch.testing.assert_close(tok, torch.tensor([[NLL_HI, NLL_LO], [0.0, NLL_HI]]))
    torch.testing.assert_close(
        sequence_nll(logits, labels), torch.tensor([NLL_HI + NLL_LO, NLL_HI])
    )
    assert token_counts(labels).tolist() == [2, 1]


def test_shape_errors_are_explicit() -> None:
    logits, labels = two_class_batch()
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        nll_loss(logits[0], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        nll_loss(logits, labels[:, :2])


def test_nll_loss_is_token_mean_over_the_batch_like_hugging_face() -> None:
    logits, labels = two_class_batch()
    expected = (NLL_HI + NLL_LO + NLL_HI) / 3  # not the mean of per-sequence means
    assert nll_loss(logits, labels).item() == pytest.approx(expected)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 2), labels[:, 1:].reshape(-1))
    assert nll_loss(logits, labels).item() == pytest.approx(ref.item())


def test_ga_is_negative_nll() -> None:
    logits, labels = two_class_batch()
    assert ga_loss(logits, labels).item() == pytest.approx(-(2 * NLL_HI + NLL_LO) / 3)


def test_npo_by_hand() -> None:
    logits, labels = two_class_batch()
    ref = torch.zeros_like(logits)  # uniform: every answer token has p = 1/2
    beta = 0.5
    nll = [NLL_HI + NLL_LO, NLL_HI]
    ref_nll = [2 * math.log(2), math.log(2)]
    expected = (
        sum((2 / beta) * math.log(1 + math.exp(beta * (r - n))) for n, r in zip(nll, ref_nll)) / 2
    )
    assert npo_loss(logits, labels, ref, beta=beta).item() == pytest.approx(expected, rel=1e-6)


def test_npo_at_reference_is_2_over_beta_log2_with_ga_gradient() -> None:
    logits, labels, _ = random_batch()
    beta = 0.3
    x = logits.clone().requires_grad_(True)
    loss = npo_loss(x, labels, logits, beta=beta)
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    (g_npo,) = torch.autograd.grad(loss, x)
    y = logits.clone().requires_grad_(True)
    (g_ga,) = torch.autograd.grad(-sequence_nll(y, labels).sum() / labels.shape[0], y)
    torch.testing.assert_close(g_npo, g_ga)


def test_npo_reference_gets_no_gradient() -> None:
    logits, labels, ref = random_batch()
    ref = ref.clone().requires_grad_(True)
    x = logits.clone().requires_grad_(True)
    npo_loss(x, labels, ref).backward()
    assert ref.grad is None and x.grad is not None


def test_simnpo_by_hand() -> None:
    logits, labels = two_class_batch()
    beta, delta = 2.0, 0.1
    avg = [(NLL_HI + NLL_LO) / 2, NLL_HI / 1]
    expected = sum(-(2 / beta) * math.log(1 / (1 + math.exp(-beta * (a - delta)))) for a in avg) / 2
    assert simnpo_loss(logits, labels, beta=beta, delta=delta).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_wga_by_hand() -> None:
    logits, labels = two_class_batch()
    beta = 2.0
    terms = [0.75**beta * NLL_HI, 0.25**beta * NLL_LO, 0.75**beta * NLL_HI]
    assert wga_loss(logits, labels, beta=beta).item() == pytest.approx(-sum(terms) / 3)


def test_satimp_by_hand_and_special_cases() -> None:
    logits, labels = two_class_batch()
    b1, b2 = 2.0, 3.0

    def w(p: float) -> float:
        return p**b1 * (1 - p) ** b2

    terms = [w(0.75) * NLL_HI, w(0.25) * NLL_LO, w(0.75) * NLL_HI]
    assert satimp_loss(logits, labels, beta1=b1, beta2=b2).item() == pytest.approx(-sum(terms) / 3)
    x, y, _ = random_batch(1)
    torch.testing.assert_close(satimp_loss(x, y, 1.5, 0.0), wga_loss(x, y, 1.5))
    torch.testing.assert_close(satimp_loss(x, y, 0.0, 0.0), ga_loss(x, y))
    torch.testing.assert_close(wga_loss(x, y, 0.0), ga_loss(x, y))


def test_wga_weights_carry_no_gradient() -> None:
    logits, labels = two_class_batch()
    beta = 2.0
    x = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(wga_loss(x, labels, beta=beta), x)
    y = logits.clone().requires_grad_(True)
    weights = torch.exp(-token_nll(y, labels).detach()) ** beta
    manual = -(weights * token_nll(y, labels)).sum() / 3
    (g_manual,) = torch.autograd.grad(manual, y)
    torch.testing.assert_close(g, g_manual)


def test_idk_nll_is_nll_of_idk_answers() -> None:
    logits, labels = two_class_batch()
    torch.testing.assert_close(idk_nll_loss(logits, labels), nll_loss(logits, labels))


def test_idk_dpo_by_hand() -> None:
    logits, labels = two_class_batch()
    idk_logits = torch.zeros_like(logits)  # idk answers at p = 1/2 under the model
    ref_idk = torch.zeros_like(logits)
    ref_forget = torch.zeros_like(logits)
    beta = 0.7
    idk_labels = labels
    win = [0.0, 0.0]  # model == reference on the idk answers
    lose = [2 * math.log(2) - (NLL_HI + NLL_LO), math.log(2) - NLL_HI]
    expected = sum(math.log(1 + math.exp(-beta * (w - lo))) for w, lo in zip(win, lose)) / 2
    got = idk_dpo_loss(idk_logits, idk_labels, logits, labels, ref_idk, ref_forget, beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    at_ref = idk_dpo_loss(logits, labels, logits, labels, logits, logits, beta=beta)
    assert at_ref.item() == pytest.approx(math.log(2))


def test_retain_kl_by_hand_and_only_on_answer_tokens() -> None:
    logits, labels = two_class_batch()
    ref = torch.zeros_like(logits)
    # KL(ref || model) with ref = (1/2, 1/2), model = (1/4, 3/4), same at every position.
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert retain_kl_loss(logits, ref, labels).item() == pytest.approx(kl, rel=1e-6)
    # Change the model at the prompt/padding positions only: the loss does not move,
    # although an average over all positions would.
    perturbed = logits.clone()
    perturbed[1, 0] = torch.tensor([5.0, -5.0])  # predicts labels[1, 1] = -100
    perturbed[:, -1] = torch.tensor([3.0, 1.0])  # last position predicts nothing
    assert retain_kl_loss(perturbed, ref, labels).item() == pytest.approx(kl, rel=1e-6)
    all_positions = (
        F.kl_div(
            F.log_softmax(perturbed, -1),
            F.log_softmax(ref, -1),
            reduction="batchmean",
            log_target=True,
        )
        / perturbed.shape[1]
    )
    assert abs(all_positions.item() - kl) > 1e-2


def test_retain_kl_is_zero_at_reference_and_positive_elsewhere() -> None:
    logits, labels, ref = random_batch()
    assert retain_kl_loss(logits, logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert retain_kl_loss(logits, ref, labels).item() > 0


# ---------------------------------------------------------------- masking, dtypes
FORGET_FNS = {
    "ga": lambda x, y, r: ga_loss(x, y),
    "npo": lambda x, y, r: npo_loss(x, y, r),
    "simnpo": lambda x, y, r: simnpo_loss(x, y),
    "wga": lambda x, y, r: wga_loss(x, y),
    "satimp": lambda x, y, r: satimp_loss(x, y, 1.0, 1.0),
    "nll": lambda x, y, r: nll_loss(x, y),
    "kl": lambda x, y, r: retain_kl_loss(x, r, y),
}


@pytest.mark.parametrize("name", sorted(FORGET_FNS))
def test_masked_positions_have_no_effect(name: str) -> None:
    fn = FORGET_FNS[name]
    logits, labels, ref = random_batch()
    base = fn(logits, labels, ref)
    other = logits.clone()
    mask = labels[:, 1:] == IGNORE_INDEX
    other[:, :-1][mask] = torch.randn(int(mask.sum()), logits.shape[-1]) * 10
    other[:, -1] = 7.0  # the last position predicts nothing
    torch.testing.assert_close(fn(other, labels, ref), base)


def test_bf16_logits_are_computed_in_float32() -> None:
    logits, labels, _ = random_batch()
    low = logits.to(torch.bfloat16)
    out = nll_loss(low, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nll_loss(low.float(), labels))


def test_fully_masked_batch_gives_zero_not_nan() -> None:
    logits, _, ref = random_batch()
    labels = torch.full(logits.shape[:2], IGNORE_INDEX)
    for fn in FORGET_FNS.values():
        value = fn(logits, labels, ref)
        assert torch.isfinite(value)
    assert nll_loss(logits, labels).item() == 0.0


# ---------------------------------------------------------------- gradient signs
@pytest.mark.parametrize(
    "name", ["ga", "npo", "simnpo", "wga", "satimp", "idk_dpo", "graddiff", "npo_rt", "simnpo_rt"]
)
def test_minimising_forget_objective_raises_forget_nll(name: str) -> None:
    logits, labels, ref = random_batch(3)
    obj = get_objective(name)
    x = logits.clone().requires_grad_(True)
    f = LossInputs(x, labels, ref)
    idk_labels = labels.clone()
    idk_labels[idk_labels >= 0] = 0  # "idk" is token 0 everywhere
    i = LossInputs(x, idk_labels, ref)
    r_logits, r_labels, _ = random_batch(4)
    r = LossInputs(r_logits, r_labels, r_logits)
    loss = obj(f, r, i)
    (g,) = torch.autograd.grad(loss, x)
    before = sequence_nll(logits, labels).sum()
    after = sequence_nll(logits - 1e-2 * g, labels).sum()
    assert after > before


@pytest.mark.parametrize("name", ["nll", "kl", "idk_nll"])
def test_minimising_retain_and_idk_objectives_lowers_their_loss(name: str) -> None:
    logits, labels, ref = random_batch(5)
    x = logits.clone().requires_grad_(True)
    if name == "nll":
        loss = nll_loss(x, labels)

        def measure(z: torch.Tensor) -> torch.Tensor:
            return nll_loss(z, labels)

    elif name == "kl":
        loss = retain_kl_loss(x, ref, labels)

        def measure(z: torch.Tensor) -> torch.Tensor:
            return retain_kl_loss(z, ref, labels)

    else:
        loss = idk_nll_loss(x, labels)

        def measure(z: torch.Tensor) -> torch.Tensor:
            return idk_nll_loss(z, labels)

    (g,) = torch.autograd.grad(loss, x)
    assert measure(logits - 1e-2 * g) < measure(logits)


# ---------------------------------------------------------------- reductions
def test_token_level_reduction_weights_tokens_not_sequences() -> None:
    logits, labels = two_class_batch()
    per_seq_mean = ((NLL_HI + NLL_LO) / 2 + NLL_HI) / 2
    assert nll_loss(logits, labels).item() != pytest.approx(per_seq_mean)


def test_sequence_level_reduction_is_mean_over_sequences() -> None:
    logits, labels, ref = random_batch(7)
    per_seq = [npo_loss(logits[i : i + 1], labels[i : i + 1], ref[i : i + 1]) for i in range(3)]
    torch.testing.assert_close(npo_loss(logits, labels, ref), torch.stack(per_seq).mean())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_num_items_makes_micro_batches_add_up(name: str) -> None:
    obj = get_objective(name)
    logits, labels, ref = random_batch(11, b=4)
    r_logits, r_labels, r_ref = random_batch(12, b=4)
    idk_labels = labels.clone()
    idk_labels[idk_labels >= 0] = 1

    def inputs(sl: slice) -> tuple[LossInputs, LossInputs, LossInputs]:
        return (
            LossInputs(logits[sl], labels[sl], ref[sl]),
            LossInputs(r_logits[sl], r_labels[sl], r_ref[sl]),
            LossInputs(logits[sl], idk_labels[sl], ref[sl]),
        )

    full = obj(*inputs(slice(None)))
    parts = [slice(0, 1), slice(1, 4)]  # unequal micro-batches
    counts = [obj.item_counts(labels[s], r_labels[s], idk_labels[s]) for s in parts]
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    summed = sum(obj(*inputs(s), num_items=total) for s in parts)
    torch.testing.assert_close(summed, full)


# ---------------------------------------------------------------- registry
def test_registry_flags() -> None:
    for name in ["ga", "simnpo", "wga", "satimp", "idk_nll"]:
        assert not OBJECTIVES[name].needs_reference
        assert not OBJECTIVES[name].includes_retain
    for name in ["npo", "idk_dpo", "npo_rt", "ga_kl", "simnpo_kl"]:
        assert OBJECTIVES[name].needs_reference
    assert OBJECTIVES["graddiff"].retain_term == "nll"
    assert OBJECTIVES["npo_rt"].retain_term == "nll"
    assert OBJECTIVES["ga_kl"].retain_term == "kl"
    assert OBJECTIVES["idk_nll"].batches == ("idk",)
    assert OBJECTIVES["idk_dpo_rt"].batches == ("forget", "idk", "retain")
    assert OBJECTIVES["npo"].forget_level == "sequence"
    assert OBJECTIVES["wga"].forget_level == "token"
    assert get_objective("GradDiff").name == "graddiff"
    assert get_objective("grad_diff").name == "graddiff"
    assert get_objective("NPO+RT").name == "npo_rt"


def test_get_objective_overrides_and_errors() -> None:
    obj = get_objective("npo", beta=0.5)
    assert obj.hparams["beta"] == 0.5
    assert OBJECTIVES["npo"].hparams["beta"] == 0.1  # the registry entry is unchanged
    logits, labels, ref = random_batch()
    torch.testing.assert_close(
        obj(LossInputs(logits, labels, ref)), npo_loss(logits, labels, ref, beta=0.5)
    )
    with pytest.raises(KeyError, match="unknown objective"):
        get_objective("nope")
    with pytest.raises(TypeError, match="no hyperparameter"):
        get_objective("ga", beta=1.0)
    with pytest.raises(ValueError, match="reference model's logits"):
        get_objective("npo")(LossInputs(logits, labels))
    with pytest.raises(ValueError, match="retain batch"):
        get_objective("graddiff")(LossInputs(logits, labels))


def test_combinations_match_their_functions() -> None:
    f, fl, fr = random_batch(1)
    r, rl, rr = random_batch(2)
    F_, R = LossInputs(f, fl, fr), LossInputs(r, rl, rr)
    torch.testing.assert_close(
        get_objective("graddiff", alpha=0.3)(F_, R), grad_diff_loss(f, fl, r, rl, 0.3)
    )
    torch.testing.assert_close(get_objective("ga_kl")(F_, R), ga_kl_loss(f, fl, r, rl, rr))
    torch.testing.assert_close(
        get_objective("npo_rt", beta=0.2)(F_, R), npo_rt_loss(f, fl, fr, r, rl, beta=0.2)
    )
    torch.testing.assert_close(
        get_objective("simnpo_rt", delta=0.5)(F_, R), simnpo_rt_loss(f, fl, r, rl, delta=0.5)
    )
    torch.testing.assert_close(
        get_objective("wga_rt", alpha=2.0)(F_, R), wga_loss(f, fl) + 2.0 * nll_loss(r, rl)
    )


def test_objective_as_gru_forget_closure() -> None:
    """A named objective drives GRUOptimizer's closure path; retain NLL is the retain closure."""
    from gru_optim import GRUOptimizer

    torch.manual_seed(0)
    vocab, t = 6, 5
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    ref = torch.nn.Sequential(torch.nn.Embedding(vocab, 8), torch.nn.Linear(8, vocab))
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, vocab, (4, t))
    forget = {"input_ids": ids[:2], "labels": ids[:2]}
    retain = {"input_ids": ids[2:], "labels": ids[2:]}
    obj = get_objective("npo")
    opt = GRUOptimizer(torch.optim.SGD(model.parameters(), lr=0.5))

    def call(m: torch.nn.Module):
        return lambda input_ids, **_: m(input_ids)

    def forget_closure() -> torch.Tensor:
        loss = obj.model_loss(call(model), forget, ref_model=call(ref))
        loss.backward()
        return loss

    def retain_closure() -> torch.Tensor:
        loss = nll_loss(model(retain["input_ids"]), retain["labels"])
        loss.backward()
        return loss

    with torch.no_grad():
        before = sequence_nll(model(forget["input_ids"]), forget["labels"]).sum()
    for _ in range(5):
        opt.zero_grad()
        opt.step(forget_closure, retain_closure)
    with torch.no_grad():
        after = sequence_nll(model(forget["input_ids"]), forget["labels"]).sum()
    assert after > before
    assert torch.isfinite(opt.last_stats["dot"])


def test_importing_gru_optim_leaves_transformers_unimported() -> None:
    """The objectives and data need only torch; the Hugging Face module loads on demand."""
    import subprocess
    import sys

    code = (
        "import sys, gru_optim, gru_optim.objectives, gru_optim.data; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
