import pytest
import torch

from fewstep.core.models import DiscreteVP, GaussianMixtureDenoiser, toy_mixture
from fewstep.core.sampling import fine_solution, get_sampler, get_sigmas, search_schedule


def _batch(ms, n, seed):
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return noise * ms.sigma_max


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_searched_schedule_beats_karras_and_uniform_on_heldout_noise(sampler):
    ms = DiscreteVP("eps", "scaled_linear")
    den = GaussianMixtureDenoiser(toy_mixture(dim=2, components=8), ms)
    x_train, x_test = _batch(ms, 128, 0), _batch(ms, 512, 1)
    ref = fine_solution(den, x_test, get_sigmas("karras", ms, 96), substeps=8)[-1]
    for nfe in (4, 6, 8):
        sig, info = search_schedule(den, x_train, nfe, sampler=sampler, grid_size=32, return_info=True)
        assert len(sig) == nfe + 1 and sig[-1] == 0 and info["error"] <= info["dp_error"] + 1e-9

        def err(s):
            out = get_sampler(sampler)(den, x_test, s, disable=True)
            return float(((out - ref) ** 2).mean().sqrt())

        e_search = err(sig)
        assert e_search < err(get_sigmas("karras", ms, nfe)), (nfe, sig)
        assert e_search < err(get_sigmas("uniform", ms, nfe)), (nfe, sig)


def test_search_bad_input():
    ms = DiscreteVP("eps")
    den = GaussianMixtureDenoiser(toy_mixture(), ms)
    x = _batch(ms, 4, 0)
    with pytest.raises(ValueError, match="grid_size"):
        search_schedule(den, x, 8, grid_size=4)
    with pytest.raises(ValueError, match="nfe"):
        search_schedule(den, x, 0)
    with pytest.raises(ValueError, match="unknown sampler"):
        search_schedule(den, x, 4, sampler="nope")
