import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf, oas

from diki_model.stats import GaussianAccumulator, GaussianScorer, ScoreStats


def unit_features(n: int, d: int, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + shift
    x[:, 0] += 3.0  # a dominant direction, like real CLIP features
    return torch.nn.functional.normalize(x, dim=1)


def test_merge_of_shards_equals_one_shot_fit():
    x = unit_features(300, 16)
    whole = GaussianAccumulator(16).update(x)
    parts = [GaussianAccumulator(16).update(x[i : i + 70]) for i in range(0, 300, 70)]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    assert merged.count == whole.count == 300
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    g1, g2 = whole.finalize(), merged.finalize()
    torch.testing.assert_close(g1.cov, g2.cov, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_is_exact():
    acc = GaussianAccumulator(8).update(unit_features(40, 8))
    back = GaussianAccumulator.from_state_dict(acc.state_dict())
    assert back.count == 40
    torch.testing.assert_close(back.finalize().cov, acc.finalize().cov, rtol=0, atol=0)


@pytest.mark.parametrize("n", [10, 50, 400])
def test_ledoit_wolf_matches_sklearn(n):
    x = unit_features(n, 24, seed=n)
    g = GaussianAccumulator(24).update(x).finalize("ledoit_wolf", eps=0.0)
    ref, shrink = ledoit_wolf(x.numpy())
    np.testing.assert_allclose(g.cov.numpy(), ref, rtol=1e-8, atol=1e-10)
    assert g.shrinkage == pytest.approx(shrink, rel=1e-8)


def test_ledoit_wolf_exact_for_features_that_are_not_unit_norm():
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4 + 2
    g = GaussianAccumulator(6).update(x[:25]).merge(GaussianAccumulator(6).update(x[25:])).finalize(eps=0.0)
    np.testing.assert_allclose(g.cov.numpy(), ledoit_wolf(x.numpy())[0], rtol=1e-8, atol=1e-10)


def test_oas_matches_sklearn():
    x = unit_features(30, 20, seed=7)
    g = GaussianAccumulator(20).update(x).finalize("oas", eps=0.0)
    np.testing.assert_allclose(g.cov.numpy(), oas(x.numpy())[0], rtol=1e-8, atol=1e-10)


def test_fewer_images_than_dims_stays_positive_definite_and_finite():
    d = 64
    x = unit_features(12, d, seed=1)
    g = GaussianAccumulator(d).update(x).finalize("ledoit_wolf")
    eig = torch.linalg.eigvalsh(g.cov)
    assert eig.min() > 0
    scores = g.log_prob(unit_features(5, d, seed=2))
    assert torch.isfinite(scores).all()
    # The authors' estimator is singular up to its 1e-7 ridge in this regime.
    paper = GaussianAccumulator(d).update(x).finalize("paper")
    assert torch.linalg.eigvalsh(paper.cov).min() < 1e-6


def test_scorer_matches_scipy_for_several_tasks():
    d = 16
    gaussians = [
        GaussianAccumulator(d).update(unit_features(200, d, seed=s, shift=s * 0.3)).finalize() for s in range(5)
    ]
    x = unit_features(33, d, seed=99)
    ref = np.stack([multivariate_normal(g.mean.numpy(), g.cov.numpy()).logpdf(x.numpy()) for g in gaussians], axis=1)
    got64 = GaussianScorer(gaussians, dtype=torch.float64, task_chunk=2).score(x)
    np.testing.assert_allclose(got64.numpy(), ref, rtol=1e-9, atol=1e-7)
    got32 = GaussianScorer(gaussians, dtype=torch.float32).score(x)
    assert got32.shape == (33, 5)
    np.testing.assert_allclose(got32.numpy(), ref, rtol=1e-4, atol=0.05)
    assert (got32.argmax(1).numpy() == ref.argmax(1)).all()


def test_scorer_rejects_mixed_dims_and_empty():
    a = GaussianAccumulator(4).update(unit_features(20, 4)).finalize()
    b = GaussianAccumulator(5).update(unit_features(20, 5)).finalize()
    with pytest.raises(ValueError, match="different feature dims"):
        GaussianScorer([a, b])
    with pytest.raises(ValueError, match="at least one"):
        GaussianScorer([])


def test_errors_are_clear():
    acc = GaussianAccumulator(4)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        acc.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2"):
        acc.update(torch.zeros(1, 4)).finalize()
    with pytest.raises(ValueError, match="unknown shrinkage"):
        GaussianAccumulator(4).update(unit_features(9, 4)).finalize("nope")


def test_score_stats_merge():
    s = torch.randn(100, dtype=torch.float64)
    a = ScoreStats().update(s[:30]).merge(ScoreStats().update(s[30:]))
    assert a.mean == pytest.approx(float(s.mean()))
    assert a.std == pytest.approx(float(s.std()))


def test_tf32_split_is_exact_and_hi_has_ten_mantissa_bits():
    from diki_model.stats import split_tf32

    t = torch.randn(1000, dtype=torch.float32)
    hi, lo = split_tf32(t)
    assert torch.equal(hi + lo, t)
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()
    assert (lo.abs() <= t.abs() * 2**-10).all()


def test_three_product_whitening_matches_float64_on_cpu():
    """The 3xTF32 path (used on CUDA) computed here in float32 arithmetic: same result as float64."""
    from diki_model.stats import _whiten_3xtf32_impl, split_tf32

    d = 32
    gaussians = [GaussianAccumulator(d).update(unit_features(100, d, seed=s)).finalize() for s in range(3)]
    scorer = GaussianScorer(gaussians)
    x = unit_features(7, d, seed=5).float()
    z = _whiten_3xtf32_impl(*split_tf32(scorer.w), *split_tf32(x))
    ref = torch.einsum("tij,nj->tni", scorer.w.double(), x.double())
    torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [5, 40])
def test_paper_covariance_is_the_unbiased_sample_covariance_plus_eps_identity(n):
    x = unit_features(n, 8, seed=n)
    for eps in (1e-3, 0.0):
        g = GaussianAccumulator(8).update(x).finalize("paper", eps=eps)
        want = np.cov(x.numpy(), rowvar=False, ddof=1) + eps * np.eye(8)
        np.testing.assert_allclose(g.cov.numpy(), want, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(g.mean.numpy(), x.numpy().mean(axis=0), rtol=1e-12, atol=1e-15)
        assert g.shrinkage == 0.0
    # The default ridge is the authors' 1e-7.
    default = GaussianAccumulator(8).update(x).finalize("paper")
    np.testing.assert_allclose(
        default.cov.numpy(), np.cov(x.numpy(), rowvar=False) + 1e-7 * np.eye(8), rtol=1e-10, atol=1e-15
    )


def test_state_dict_of_another_precision_is_read_back_in_float64():
    x = unit_features(30, 5, seed=11)
    state = {
        k: (v.float() if v.is_floating_point() else v) for k, v in GaussianAccumulator(5).update(x).state_dict().items()
    }
    back = GaussianAccumulator.from_state_dict(state)
    assert back.count == 30 and isinstance(back.count, int)
    for t in (back.sum, back.outer, back.sum_sqnorm2, back.sum_sqnorm_y):
        assert t.dtype == torch.float64
    assert GaussianAccumulator(5).update(x).state_dict()["count"].dtype == torch.int64


def test_log_prob_is_float64_for_float32_features():
    x = unit_features(200, 6, seed=12)
    g = GaussianAccumulator(6).update(x).finalize()
    probe = unit_features(9, 6, seed=13).float()
    ref = multivariate_normal(g.mean.numpy(), g.cov.numpy()).logpdf(probe.double().numpy())
    got = g.log_prob(probe)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-11, atol=1e-9)


def test_scorer_three_product_whitening_of_a_task_chunk():
    """The CUDA path's whitening (3 TF32 products, split factors cached), run on CPU for tasks 1..2 of 4."""
    from diki_model.stats import split_tf32

    d = 16
    gaussians = [
        GaussianAccumulator(d).update(unit_features(80, d, seed=20 + s, shift=0.2 * s)).finalize() for s in range(4)
    ]
    scorer = GaussianScorer(gaussians)
    x = unit_features(5, d, seed=30).float()
    ref = torch.einsum("tij,nj->tni", scorer.w[1:3].double(), x.double())
    for _ in range(2):  # the second call reuses the cached split of W
        z = scorer._whiten_3xtf32(1, 3, *split_tf32(x))
        assert z.shape == (2, 5, d)
        torch.testing.assert_close(z.double(), ref, rtol=1e-5, atol=1e-4)


def test_degenerate_features_get_the_eps_ridge_and_no_nan():
    same = torch.tensor([[1.0, 0.0, 0.0]] * 4, dtype=torch.float64)  # all images identical: S = 0 exactly
    lw = GaussianAccumulator(3).update(same).finalize("ledoit_wolf", eps=1e-3)
    torch.testing.assert_close(lw.cov, 1e-3 * torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert lw.shrinkage == 0.0 and lw.cov.dtype == torch.float64
    o = GaussianAccumulator(3).update(same).finalize("oas", eps=1e-3)
    torch.testing.assert_close(o.cov, 1e-3 * torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-15)
    assert o.shrinkage == 1.0  # sklearn's convention when its denominator is 0
    torch.testing.assert_close(lw.mean, same[0])


@pytest.mark.parametrize("n", [2, 3])
def test_oas_shrinkage_with_very_few_images_matches_sklearn(n):
    x = unit_features(n, 12, seed=40 + n)
    g = GaussianAccumulator(12).update(x).finalize("oas", eps=0.0)
    ref, shrink = oas(x.numpy())
    np.testing.assert_allclose(g.cov.numpy(), ref, rtol=1e-8, atol=1e-12)
    assert g.shrinkage == pytest.approx(shrink, rel=1e-9) and g.shrinkage <= 1.0


def test_the_fewest_images_each_estimate_needs():
    x = unit_features(2, 4, seed=8)
    one = GaussianAccumulator(4).update(x[:1])
    torch.testing.assert_close(one.mean(), x[0])
    torch.testing.assert_close(one.covariance_mle(), torch.zeros(4, 4, dtype=torch.float64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match=r"^need at least 2 feature vectors to fit a Gaussian, got 1$"):
        one.finalize()
    with pytest.raises(ValueError, match=r"^need at least 1 feature vectors to fit a Gaussian, got 0$"):
        GaussianAccumulator(4).mean()
    two = GaussianAccumulator(4).update(x)
    for shrinkage in ("ledoit_wolf", "oas", "paper"):
        assert torch.isfinite(two.finalize(shrinkage).cov).all()
    want = np.cov(x.numpy(), rowvar=False) + 1e-7 * np.eye(4)
    np.testing.assert_allclose(two.finalize("paper").cov.numpy(), want, rtol=1e-9, atol=1e-15)


def test_score_stats_accumulate_over_updates_in_float64():
    s = torch.randn(50, dtype=torch.float64)
    a = ScoreStats().update(s[:10]).update(s[10:35]).update(s[35:])
    assert a.count == 50
    assert a.mean == pytest.approx(float(s.mean()), rel=1e-12) and a.std == pytest.approx(float(s.std()), rel=1e-10)
    # float32 scores are summed in float64: 2^24 + 1 is not a float32 sum, but it is a float64 one.
    big = torch.tensor([2.0**24, 1.0], dtype=torch.float32)
    b = ScoreStats().update(big)
    assert b.total == 2.0**24 + 1 and b.total_sq == 2.0**48 + 1
    with pytest.raises(ValueError, match="^no held-out scores recorded$"):
        _ = ScoreStats().mean
    with pytest.raises(ValueError, match="^need at least 2 held-out scores for a standard deviation$"):
        _ = ScoreStats().update(torch.ones(1)).std
    assert ScoreStats().update(torch.full((4,), 3.0)).std == 0.0


def test_scorer_keeps_whitening_in_its_dtype_and_constants_in_float64():
    g = [GaussianAccumulator(4).update(unit_features(20, 4, seed=s)).finalize() for s in range(2)]
    scorer = GaussianScorer(g)
    assert scorer.w.dtype == scorer.b.dtype == torch.float32 and scorer.const.dtype == torch.float64
    assert scorer.w.shape == (2, 4, 4) and scorer.b.shape == (2, 4) and scorer.const.shape == (2,)
    assert (scorer.dim, scorer.num_tasks, scorer.task_chunk, scorer.use_split) == (4, 2, 64, True)
    double = GaussianScorer(g, dtype=torch.float64)
    assert double.w.dtype == double.b.dtype == torch.float64
    for i, gi in enumerate(g):
        logdet = float(torch.logdet(gi.cov))
        assert float(double.const[i]) == pytest.approx(-0.5 * (logdet + 4 * math.log(2 * math.pi)), rel=1e-12)


def test_oas_shrinkage_is_capped_at_one_like_sklearn():
    # Nearly isotropic features: the OAS formula gives 2.8 here, and sklearn caps it at 1.
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = GaussianAccumulator(3).update(x).finalize("oas", eps=0.0)
    ref, shrink = oas(x.numpy())
    assert shrink == 1.0 and g.shrinkage == 1.0
    np.testing.assert_allclose(g.cov.numpy(), ref, rtol=1e-10, atol=1e-14)
