"""Policy loss and aggregation against hand-computed cases; ratio 1 gives the REINFORCE gradient."""

import pytest
import torch

from components.algos.losses import (
    AGGREGATIONS,
    LossConfig,
    LossInputs,
    get_aggregation,
    get_policy_loss,
    kl_k3,
    ppo_clip_tokens,
    token_logprobs_and_entropy,
)
from components.errors import ConfigError

X = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_token_mean():
    assert AGGREGATIONS["token-mean"](X, M).item() == pytest.approx(10 / 4)


def test_seq_mean_token_mean():
    assert AGGREGATIONS["seq-mean-token-mean"](X, M).item() == pytest.approx((2 + 4) / 2)


def test_seq_mean_token_sum_norm_uses_constant():
    assert AGGREGATIONS["seq-mean-token-sum-norm"](X, M, norm_len=8).item() == pytest.approx((6 / 8 + 4 / 8) / 2)
    assert AGGREGATIONS["seq-mean-token-sum-norm"](X, M).item() == pytest.approx((6 / 4 + 4 / 4) / 2)


def test_unknown_aggregation_names_field():
    with pytest.raises(ConfigError, match="model.loss.agg"):
        get_aggregation("mean")


def _loss(ratio: float, adv: float, **kw) -> float:
    logp = torch.tensor([[float(torch.log(torch.tensor(ratio)))]])
    loss, _ = ppo_clip_tokens(logp, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1), **kw)
    return loss.item()


def test_clip_symmetric_and_clip_higher():
    # positive advantage: gain capped at 1 + eps_high
    assert _loss(1.5, 1.0, clip_low=0.2, clip_high=0.2) == pytest.approx(-1.2)
    assert _loss(1.5, 1.0, clip_low=0.2, clip_high=0.28) == pytest.approx(-1.28)
    assert _loss(1.1, 1.0, clip_low=0.2, clip_high=0.28) == pytest.approx(-1.1)
    # negative advantage: ratio below 1 - eps_low is clipped (pessimistic max)
    assert _loss(0.5, -1.0, clip_low=0.2, clip_high=0.28) == pytest.approx(0.8)
    # negative advantage with a huge ratio is not clipped without dual clip
    assert _loss(5.0, -1.0, clip_low=0.2, clip_high=0.2) == pytest.approx(5.0)


def test_dual_clip_caps_negative_advantage_loss():
    assert _loss(5.0, -1.0, clip_low=0.2, clip_high=0.2, dual_clip=3.0) == pytest.approx(3.0)
    assert _loss(2.0, -1.0, clip_low=0.2, clip_high=0.2, dual_clip=3.0) == pytest.approx(2.0)
    # positive advantages are unaffected by the dual clip
    assert _loss(5.0, 1.0, clip_low=0.2, clip_high=0.2, dual_clip=3.0) == pytest.approx(-1.2)


def test_clip_indicator():
    logp = torch.log(torch.tensor([[1.5, 1.0]]))
    _, info = ppo_clip_tokens(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    assert info["clipped"].tolist() == [[1.0, 0.0]]


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_ratio_one_gradient_equals_reinforce(agg):
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    targets = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([[0.5], [-1.0], [2.0]]).expand(3, 5) * mask
    logp, _ = token_logprobs_and_entropy(logits, targets)
    loss, _ = ppo_clip_tokens(logp, logp.detach(), adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    (g_ppo,) = torch.autograd.grad(AGGREGATIONS[agg](loss, mask, norm_len=5), logits)
    logp2, _ = token_logprobs_and_entropy(logits, targets)
    reinforce = AGGREGATIONS[agg](-adv * logp2, mask, norm_len=5)
    (g_rf,) = torch.autograd.grad(reinforce, logits)
    assert torch.allclose(g_ppo, g_rf, atol=1e-6)
    assert g_rf.abs().sum() > 0


def test_kl_k3_zero_at_equal_and_positive_otherwise():
    a = torch.tensor([-1.0, -2.0])
    assert torch.allclose(kl_k3(a, a), torch.zeros(2))
    assert (kl_k3(a, a + 0.3) > 0).all()


def test_temperature_scales_logprobs():
    logits = torch.tensor([[[2.0, 0.0]]])
    lp1, _ = token_logprobs_and_entropy(logits, torch.tensor([[0]]), 1.0)
    lp2, _ = token_logprobs_and_entropy(logits, torch.tensor([[0]]), 2.0)
    assert lp2.item() == pytest.approx(torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0].item())
    assert lp1.item() > lp2.item()  # a sharper distribution puts more mass on the argmax


def _split_loss(x: torch.Tensor, mask: torch.Tensor, agg: str, splits: list[list[int]]) -> torch.Tensor:
    """The module's micro-batch accumulation: each micro-batch's aggregate times its share of the
    mini-batch's denominator (tokens for token-mean, non-empty rows otherwise)."""
    fn = AGGREGATIONS[agg]
    tok_den = mask.sum().clamp(min=1)
    seq_den = (mask.sum(-1) > 0).sum().clamp(min=1)
    total = x.new_zeros(())
    for rows in splits:
        m = mask[rows]
        share = m.sum() / tok_den if agg == "token-mean" else (m.sum(-1) > 0).sum() / seq_den
        total = total + fn(x[rows], m, norm_len=6) * share
    return total


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_gradient_does_not_depend_on_the_micro_batch_split_with_an_empty_response(agg):
    # Row 2 has no response token. Dr. GRPO's divisor used to count it inside its micro-batch while
    # the module weighted micro-batches by non-empty rows: the gradient changed with the split.
    torch.manual_seed(0)
    x = torch.randn(5, 6, requires_grad=True)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]],
        dtype=torch.float,
    )
    (whole,) = torch.autograd.grad(AGGREGATIONS[agg](x, mask, norm_len=6), x)
    for splits in ([[0, 1, 2, 3, 4]], [[0, 1], [2, 3, 4]], [[2], [0, 1, 3, 4]], [[0], [1], [2], [3], [4]]):
        (g,) = torch.autograd.grad(_split_loss(x, mask, agg, splits), x)
        assert torch.allclose(g, whole, atol=1e-7), (agg, splits)
    assert whole[2].abs().sum() == 0 and whole.abs().sum() > 0


def test_seq_mean_token_sum_norm_averages_non_empty_sequences():
    x = torch.tensor([[1.0, 2.0], [5.0, 5.0]])
    m = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert AGGREGATIONS["seq-mean-token-sum-norm"](x, m, norm_len=4).item() == pytest.approx(3 / 4)


def _inputs(n: int = 4, r: int = 5, seed: int = 0, **kw):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, r, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (n, r), generator=g)
    logp, ent = token_logprobs_and_entropy(logits, targets)
    mask = (torch.rand(n, r, generator=g) > 0.2).float()
    x = LossInputs(
        logp=logp,
        old_logp=logp.detach() + 0.1 * torch.randn(n, r, generator=g),
        advantages=torch.randn(n, 1, generator=g).expand(n, r) * mask,
        mask=mask,
        entropy=ent,
        sampling_logp=logp.detach() + 0.3 * torch.randn(n, r, generator=g),
        ref_logp=logp.detach() - 0.2,
        tok_den=mask.sum(),
        seq_den=(mask.sum(-1) > 0).sum(),
        norm_len=r,
    )
    for k, v in kw.items():
        setattr(x, k, v)
    return logits, x


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_registered_loss_is_surrogate_plus_tis_kl_entropy_aggregated(agg):
    cfg = LossConfig(agg=agg, clip_low=0.2, clip_high=0.28, kl_coef=0.05, entropy_coef=0.01, tis_cap=2.0)
    _, x = _inputs()
    loss, metrics = get_policy_loss("ppo_clip")(x, cfg)
    pg, _ = ppo_clip_tokens(x.logp, x.old_logp, x.advantages, x.mask, clip_low=0.2, clip_high=0.28)
    pg = pg * torch.exp(x.old_logp - x.sampling_logp).clamp(max=2.0)
    total = pg + 0.05 * kl_k3(x.logp, x.ref_logp) - 0.01 * x.entropy
    assert loss.item() == pytest.approx(AGGREGATIONS[agg](total, x.mask, norm_len=5).item(), rel=1e-6)
    for key in ("loss/policy", "loss/kl", "policy/entropy", "policy/clip_frac", "rollout/tis_weight_mean"):
        assert key in metrics and isinstance(metrics[key], float)
    assert metrics["loss/kl"] > 0


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_micro_batch_shares_add_up_to_the_mini_batch_loss(agg):
    # The loss of each micro-batch is its share of the mini-batch aggregate: summing the shares of
    # any split of the rows gives the whole mini-batch's loss (so accumulated gradients are exact).
    cfg = LossConfig(agg=agg)
    _, x = _inputs(n=6)
    whole, _ = get_policy_loss("ppo_clip")(x, cfg)
    parts = 0.0
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = LossInputs(
            x.logp[rows], x.old_logp[rows], x.advantages[rows], x.mask[rows], x.entropy[rows],
            x.sampling_logp[rows], x.ref_logp[rows], x.tok_den, x.seq_den, x.norm_len,
        )  # fmt: skip
        parts = parts + get_policy_loss("ppo_clip")(part, cfg)[0]
    assert float(parts) == pytest.approx(float(whole), rel=1e-5)
