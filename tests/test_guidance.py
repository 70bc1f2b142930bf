import pytest
import torch

from fewstep.core.guidance import CFGDenoiser, cfg_combine, from_lcm_omega, from_paper_cfg, to_lcm_omega
from fewstep.core.models import EDM


class LabelNet(torch.nn.Module):
    """x0 = label-dependent constant image plus a function of x (lets cond and uncond differ)."""

    model_sampling = EDM()

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        return 0.1 * x + class_labels.float().reshape(-1, 1, 1, 1)


def test_cfg_convention_and_single_batched_pass():
    net = LabelNet()
    x = torch.randn(3, 1, 2, 2)
    y = torch.tensor([1, 2, 3])
    for w in (0.0, 1.0, 2.5):
        net.calls = 0
        out = CFGDenoiser(net, w, null=10)(x, torch.tensor(1.0), class_labels=y)
        cond, uncond = net(x, 1.0, class_labels=y), net(x, 1.0, class_labels=torch.full_like(y, 10))
        torch.testing.assert_close(out, uncond + w * (cond - uncond))
    assert CFGDenoiser(net, 1.0)(x, 1.0, class_labels=y).shape == x.shape


def test_scale_one_is_one_pass():
    net = LabelNet()
    CFGDenoiser(net, 1.0)(torch.randn(2, 1, 2, 2), 1.0, class_labels=torch.tensor([0, 1]))
    assert net.calls == 1
    net.calls = 0
    CFGDenoiser(net, 3.0)(torch.randn(2, 1, 2, 2), 1.0, class_labels=torch.tensor([0, 1]))
    assert net.calls == 1  # cond and uncond in one batched forward


def test_conversions():
    """LCM's omega: eps_c + omega (eps_c - eps_u) equals fewstep's uncond + w (cond - uncond)."""
    c, u = torch.randn(4), torch.randn(4)
    omega = 7.0
    lcm = c + omega * (c - u)
    torch.testing.assert_close(cfg_combine(c, u, from_lcm_omega(omega)), lcm)
    assert to_lcm_omega(from_lcm_omega(omega)) == omega
    w_paper = 3.0
    torch.testing.assert_close(cfg_combine(c, u, from_paper_cfg(w_paper)), (1 + w_paper) * c - w_paper * u)


def test_missing_condition_is_clear():
    with pytest.raises(ValueError, match="class_labels"):
        CFGDenoiser(LabelNet(), 2.0)(torch.randn(1, 1, 2, 2), 1.0)
