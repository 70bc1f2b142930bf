"""Mode coverage on a Gaussian mixture (issue 13): a 2-D student distilled from the exact 8-mode teacher by each
method must put samples on every mode, in proportion to its weight, and near the modes (a Gaussian blob over the
ring covers every mode by nearest-mode counting but has only 37% of its samples near one; the teacher 100%).

Mode collapse, the failure the shipped DMD2 student had, fails the share check; blurring between modes fails the
nearness check. Each method trains in well under a minute of one CPU thread (unloaded).
"""

import gmm_students as G
import pytest
import torch

torch.set_num_threads(1)
N = 4000


def _check(samples):
    ok, desc = G.covers_all_modes(samples, G.teacher(), min_share=0.3, min_precision=0.7)
    assert ok, desc


def test_coverage_check_rejects_collapse_and_blobs():
    den = G.teacher()
    torch.manual_seed(0)
    assert G.covers_all_modes(den.mixture.sample(N), den)[0]
    assert not G.covers_all_modes(G.SIGMA_DATA * torch.randn(N, 2), den)[0]  # a blob: every mode, none sharply
    one_mode = den.mixture.means[:1].float() + 0.3 * torch.randn(N, 2)
    assert not G.covers_all_modes(one_mode, den)[0]  # collapse onto one mode
    half = den.mixture.sample(N)
    half = half[G.mode_fractions(half, den)[0].argmax() != torch.cdist(half, den.mixture.means.float()).argmin(1)]
    assert not G.covers_all_modes(half, den)[0]  # one mode missing


@pytest.mark.parametrize("variant", ["dmd", "dmd_gan", "dmd_regression"])
def test_dmd_covers_every_mode(variant):
    gen, logs = G.train_dmd(gan_weight=0.3 if variant == "dmd_gan" else 0.0,
                            regression_weight=1.0 if variant == "dmd_regression" else 0.0)
    with torch.no_grad():
        _check(gen(torch.randn(N, 2)))
    if variant == "dmd_gan":  # the discriminator learns: its loss ends below chance (2 ln 2)
        tail = logs["gan_d"][-100:]
        assert sum(tail) / len(tail) < 2 * torch.log(torch.tensor(2.0)).item() - 0.03


def test_dmd_from_a_collapsed_start_spreads_over_every_mode():
    """The distribution-matching gradient moves a generator that maps all noise to one point onto every mode,
    given a fake score that tracks it (the DMD2 critic) and the regression anchor."""
    gen, _ = G.train_dmd(regression_weight=1.0, collapsed_start=True)
    with torch.no_grad():
        _check(gen(torch.randn(N, 2)))


@pytest.mark.slow
def test_consistency_covers_every_mode():
    student = G.train_consistency()
    with torch.no_grad():
        _check(student(torch.randn(N, 2) * G.SIGMA_MAX, torch.tensor(G.SIGMA_MAX)))


def test_reflow_covers_every_mode():
    """Reflow on the teacher's ODE pairs, sampled with 4 Euler steps on its straight path (one step blurs the
    modes of a once-rectified flow: 45% near a mode in our run)."""
    student = G.train_reflow()
    sig = torch.linspace(G.SIGMA_MAX, 0, 5)
    x = torch.randn(N, 2) * G.SIGMA_MAX
    with torch.no_grad():
        for i in range(4):
            x0 = student(x, sig[i])
            x = x0 + sig[i + 1] / sig[i] * (x - x0)
    _check(x)
