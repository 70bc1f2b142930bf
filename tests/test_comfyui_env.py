"""The ComfyUI fixture works: a real ComfyUI tree of the selected version (``$FEWSTEP_COMFYUI_VERSION``, see
``tests/comfy_versions.py``), importable, its samplers runnable on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import comfy_versions
import comfyui_env  # noqa: E402
import pytest
import torch

# ----------------------------------------------------------------------------- no ComfyUI needed


def test_filtered_requirements_skips_torch_family(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "comfyui-frontend-package==1.32.9\ntorch\ntorchsde\ntorchvision\nTorchAudio\nnumpy>=1.25.0\n"
        "\n#non essential dependencies:\nkornia>=0.7.1\nspandrel\npydantic~=2.0  # comment\n"
    )
    assert comfyui_env.filtered_requirements(tmp_path) == [
        "comfyui-frontend-package==1.32.9",
        "torchsde",
        "numpy>=1.25.0",
        "kornia>=0.7.1",
        "pydantic~=2.0",
    ]


def test_missing_requirements_uses_installed_metadata():
    assert comfyui_env.missing_requirements(["pytest>=1", "torch>=1"]) == []
    assert comfyui_env.missing_requirements(["pytest<1"]) == ["pytest<1"]
    assert comfyui_env.missing_requirements(["surely-not-installed-fewstep-xyz"]) != []


@pytest.mark.skipif("torchvision" not in comfyui_env.stubbed_packages(), reason="a real torchvision is installed")
def test_torchvision_stub_leaves_no_trace():
    # Names are importable (0.33 does `from torchvision.ops import deform_conv2d` at import time) but unusable:
    # calling one raises, reading an attribute of one raises AttributeError, both naming the stub.
    with comfyui_env.torchvision_stub_on_path() as used:
        assert used
        import torchvision.transforms as transforms
        from torchvision.ops import deform_conv2d
        from torchvision.transforms.functional import InterpolationMode

        with pytest.raises(RuntimeError, match="torchvision.transforms.Compose is unavailable.*fewstep's test stub"):
            transforms.Compose([])
        with pytest.raises(RuntimeError, match="fewstep's test stub"):
            deform_conv2d(torch.zeros(1))
        with pytest.raises(AttributeError, match="fewstep's test stub"):
            InterpolationMode.BILINEAR  # noqa: B018
    assert importlib.util.find_spec("torchvision") is None
    assert not any(name.split(".")[0] == "torchvision" for name in sys.modules)


@pytest.mark.skipif("torchaudio" not in comfyui_env.stubbed_packages(), reason="a real torchaudio is installed")
def test_torchaudio_stub_leaves_no_trace():
    with comfyui_env.torchvision_stub_on_path():
        import torchaudio
        import torchaudio.functional as AF

        with pytest.raises(RuntimeError, match="torchaudio.load is unavailable"):
            torchaudio.load("x.wav")
        with pytest.raises(RuntimeError, match="fewstep's test stub"):
            AF.resample(torch.zeros(4), 1, 2)
    assert importlib.util.find_spec("torchaudio") is None
    assert not any(name.split(".")[0] == "torchaudio" for name in sys.modules)


def test_version_setting(monkeypatch):
    monkeypatch.delenv(comfy_versions.ENV_VERSION, raising=False)
    assert comfy_versions.selected() == "0.3.75"
    monkeypatch.setenv(comfy_versions.ENV_VERSION, "0.33.0")
    assert comfy_versions.selected() == "0.33.0"
    monkeypatch.setenv(comfy_versions.ENV_VERSION, "0.4")
    with pytest.raises(ValueError, match=r"FEWSTEP_COMFYUI_VERSION='0.4' is not a supported.*0.3.75, 0.33.0"):
        comfy_versions.selected()


def test_version_conventions_follow_the_release_notes():
    old, new = comfy_versions.for_version("0.3.75"), comfy_versions.for_version("0.33.0")
    assert (old.ancestral_seed(42), new.ancestral_seed(42)) == (42, 43)  # seed + 1 on CPU since 0.6.0
    assert comfy_versions.for_version("0.5.1").cpu_noise_seed_offset == 0
    assert comfy_versions.for_version("0.6.0").cpu_noise_seed_offset == 1
    assert not old.validates_v3_combos_at_prompt and new.validates_v3_combos_at_prompt  # 0.7.0
    assert not old.samplers_read_model_patcher and new.samplers_read_model_patcher  # 0.21.0
    assert not old.clone_shares_option_objects and new.clone_shares_option_objects  # 0.13.0
    assert "txt_ids_dims" in new.unet_config_extra["flux"] and "flux" not in old.unet_config_extra
    with pytest.raises(ValueError, match="older than the oldest supported"):
        comfy_versions.for_version("0.3.60")


def test_archive_is_checked_against_its_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv(comfyui_env.ENV_ARCHIVES, str(tmp_path))
    with pytest.raises(comfyui_env.ComfyUIEnvError, match="archive not found.*FEWSTEP_COMFYUI_ARCHIVES"):
        comfyui_env.find_archive("0.33.0")
    (tmp_path / "comfyui-0.33.0.tar.gz").write_bytes(b"not the archive")
    with pytest.raises(comfyui_env.ComfyUIEnvError, match="has sha256 .* expected 793c8a86"):
        comfyui_env.find_archive("0.33.0")


# ----------------------------------------------------------------------------- the tree itself


@pytest.mark.comfy
def test_tree_is_the_selected_version(comfy_root):
    import comfyui_version

    assert comfy_versions.tree_version(comfy_root) == comfyui_version.__version__
    assert not (comfy_root / "extra_model_paths.yaml").exists()
    if not os.environ.get(comfyui_env.ENV_ROOT):
        assert comfyui_version.__version__ == comfy_versions.selected()
        assert (comfy_root / comfyui_env.MARKER_NAME).is_file()
        t0 = time.monotonic()
        assert comfyui_env.ensure_comfyui() == comfy_root
        assert time.monotonic() - t0 < 5.0  # installed once: later calls only check marker + metadata


@pytest.mark.comfy
def test_imports_come_from_the_tree(comfy_root, comfy_ksampling):
    import comfy.model_sampling
    import comfy.samplers

    for mod in (comfy_ksampling, comfy.model_sampling, comfy.samplers):
        assert Path(mod.__file__).resolve().is_relative_to(comfy_root), mod.__file__
    assert comfy_ksampling.__name__ == "comfy.k_diffusion.sampling"
    assert comfy.samplers.k_diffusion_sampling is comfy_ksampling
    # the stub (if any) is gone again for everybody else
    if comfyui_env.needs_torchvision_stub():
        assert importlib.util.find_spec("torchvision") is None


# ----------------------------------------------------------------------------- running ComfyUI code


def _gaussian_denoiser(x, sigma, **kwargs):
    """Exact posterior mean E[x0 | x0 + sigma n = x] for x0 ~ N(0, I)."""
    return x / (1 + sigma.view(-1, *([1] * (x.ndim - 1))) ** 2)


@pytest.mark.comfy
def test_sample_euler_constant_denoiser_is_exact(comfy_ksampling):
    # D(x, sigma) = c  =>  one Euler step maps x to c + (x - c) * sigma_next / sigma, exactly.
    torch.manual_seed(0)
    c = torch.randn(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4) * 10.0
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.5, 0.0])
    seen = []

    def model(x, sigma, **kwargs):
        assert sigma.shape == (x.shape[0],)
        return c

    out = comfy_ksampling.sample_euler(
        model, x.clone(), sigmas, callback=lambda d: seen.append(d["x"].clone()), disable=True
    )
    torch.testing.assert_close(out, c)
    for i, xi in enumerate(seen):
        torch.testing.assert_close(xi, c + (x - c) * sigmas[i] / sigmas[0], rtol=1e-5, atol=1e-5)


@pytest.mark.comfy
def test_sample_euler_follows_the_probability_flow_ode(comfy_ksampling):
    # For x0 ~ N(0, I) the PF-ODE solution is x(sigma) = x_T * sqrt(1 + sigma^2) / sqrt(1 + sigma_T^2).
    torch.manual_seed(0)
    sigmas = comfy_ksampling.get_sigmas_karras(200, 0.002, 80.0)
    assert sigmas[-1] == 0 and torch.all(sigmas[:-1] > sigmas[1:])
    x_t = torch.randn(4, 2, 8, 8) * sigmas[0]
    out = comfy_ksampling.sample_euler(_gaussian_denoiser, x_t.clone(), sigmas, disable=True)
    exact = x_t / (1 + sigmas[0] ** 2) ** 0.5
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, exact, rtol=2e-2, atol=2e-2)


@pytest.mark.comfy
def test_sample_lcm_reaches_model_sampling_through_inner_models(comfy_root, comfy_ksampling):
    """sample_lcm re-noises with the model sampling's noise_scaling.

    In ComfyUI ``model`` is a KSamplerX0Inpaint, ``.inner_model`` the CFGGuider and its
    ``.inner_model`` the BaseModel, whose ``model_sampling`` is e.g. ModelSamplingDiscrete + EPS; since 0.21.0
    sample_lcm reads it as ``model.inner_model.model_patcher.get_model_object("model_sampling")``.
    """
    import comfy.model_sampling as ms

    class ModelSampling(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    c = torch.full((1, 4, 2, 2), 0.25)
    calls = []

    sampling = ModelSampling()
    patcher = SimpleNamespace(get_model_object=lambda name: {"model_sampling": sampling}[name])

    class Denoiser:
        inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=sampling), model_patcher=patcher)

        def __call__(self, x, sigma, **kwargs):
            calls.append(float(sigma[0]))
            return c

    sigmas = torch.tensor([14.6, 3.0, 1.0, 0.0])
    noise = torch.ones_like(c)
    out = comfy_ksampling.sample_lcm(
        Denoiser(), torch.zeros_like(c), sigmas, noise_sampler=lambda s, s_next: noise, disable=True
    )
    torch.testing.assert_close(out, c)  # last sigma is 0: no re-noising after the final denoise
    assert calls == pytest.approx([14.6, 3.0, 1.0])
    # with a last sigma > 0 the output is EPS.noise_scaling(sigma, noise, denoised) = denoised + sigma * noise
    out = comfy_ksampling.sample_lcm(
        Denoiser(), torch.zeros_like(c), sigmas[:-1], noise_sampler=lambda s, s_next: noise, disable=True
    )
    torch.testing.assert_close(out, c + 1.0 * noise)


@pytest.mark.comfy
def test_host_noise_sampler_seed_convention(comfy_ksampling):
    """The host's ancestral noise on the CPU is torch.randn seeded with ``seed + offset`` (comfy_versions)."""
    offset = comfy_versions.host().cpu_noise_seed_offset
    x = torch.zeros(2, 3, 4, 4)
    ns = comfy_ksampling.default_noise_sampler(x, seed=7)
    g = torch.Generator().manual_seed(7 + offset)
    first, second = ns(1.0, 0.5), ns(0.5, 0.1)
    torch.testing.assert_close(first, torch.randn(x.shape, generator=g), rtol=0, atol=0)
    torch.testing.assert_close(second, torch.randn(x.shape, generator=g), rtol=0, atol=0)


@pytest.mark.comfy
def test_model_sampling_discrete_sigmas(comfy_root):
    import comfy.model_sampling as ms

    s = ms.ModelSamplingDiscrete()  # SD1.x defaults: "linear" betas 0.00085..0.012, 1000 steps
    sigmas = s.sigmas
    assert sigmas.shape == (1000,) and sigmas.dtype == torch.float32
    assert torch.isfinite(sigmas).all() and torch.isfinite(s.log_sigmas).all()
    assert torch.all(sigmas[1:] > sigmas[:-1])
    assert float(s.sigma_min) == pytest.approx(0.0292, abs=1e-4)
    assert float(s.sigma_max) == pytest.approx(14.6146, abs=1e-3)
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])
    torch.testing.assert_close(s.sigma(t), sigmas[t.long()])
    assert torch.equal(s.timestep(s.sigma(t)), t.long())
    zsnr = ms.ModelSamplingDiscrete(zsnr=True).sigmas
    assert torch.isfinite(zsnr).all() and torch.all(zsnr[1:] > zsnr[:-1])


@pytest.mark.comfy
def test_eps_and_v_prediction_round_trip(comfy_root):
    import comfy.model_sampling as ms

    torch.manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])

    class Eps(ms.ModelSamplingDiscrete, ms.EPS):
        pass

    class V(ms.ModelSamplingDiscrete, ms.V_PREDICTION):
        pass

    x = Eps().noise_scaling(sigma, eps.clone(), x0)  # x0 + sigma * eps
    torch.testing.assert_close(Eps().calculate_denoised(sigma, eps, x), x0)
    # v-target on the VP-scaled input x / sqrt(1 + sigma^2): v = alpha * eps - s * x0
    a = (1 / (1 + sigma**2) ** 0.5).view(-1, 1, 1, 1)
    v = a * eps - a * sigma.view(-1, 1, 1, 1) * x0
    torch.testing.assert_close(V().calculate_denoised(sigma, v, x), x0, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- main.py


@pytest.mark.comfy
@pytest.mark.slow
def test_main_py_quick_test_for_ci(comfy_root):
    out = comfyui_env.quick_test(comfy_root)
    assert set(comfyui_env.import_failures(out)) <= set(comfyui_env.EXPECTED_IMPORT_FAILURES)


@pytest.mark.comfy
@pytest.mark.slow
def test_server_serves_object_info(comfy_root):
    with comfyui_env.comfyui_server(comfy_root) as url:
        with urllib.request.urlopen(f"{url}/object_info/KSampler", timeout=30) as r:
            info = json.load(r)
    samplers = info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert {"euler", "lcm", "dpmpp_2m"} <= set(samplers)
