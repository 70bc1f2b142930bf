"""Distilled-model schedule presets (``FewstepPresetSchedule``, nodes/schedules.py): every preset equals its published
timesteps / sigmas, checked twice: against the numbers the model cards and official code publish, and against the
diffusers scheduler configuration those sources use; the node maps timestep presets through the connected model and
refuses a preset of the other model family, naming the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.comfy

#: numbers as published (model cards / official code), see each Preset.source
PUBLISHED = {
    "DMD2 SDXL 4-step": [999, 749, 499, 249],
    "DMD2 SDXL 1-step": [399],
    "LCM 4-step": [999, 759, 499, 259],
    "TCD 4-step": [999, 759, 499, 259],
    "Hyper-SD 4-step": [999, 749, 499, 249],
    "Hyper-SD 8-step": [999, 874, 749, 624, 499, 374, 249, 124],
    "Hyper-SDXL 1-step UNet": [800],
    "SDXL-Lightning 2-step": [999, 499],
    "SDXL-Lightning 4-step": [999, 749, 499, 249],
    "SDXL-Lightning 8-step": [999, 874, 749, 624, 499, 374, 249, 124],
    "Wan 2.2 Lightning 4-step (shift 5)": [1.0, 0.9375, 0.833333, 0.625],
    "Qwen-Image Lightning 4-step (shift 3)": [1.0, 0.9, 0.75, 0.5],
    "Flux schnell 4-step": [1.0, 0.75, 0.5, 0.25],
}


@pytest.fixture(scope="module")
def S(comfy_root):
    from fewstep.nodes import schedules

    return schedules


def test_every_preset_names_its_source(S):
    assert set(PUBLISHED) <= set(S.PRESETS)
    for name, p in S.PRESETS.items():
        assert p.unit in ("timestep", "sigma") and p.source and p.models, name
        assert list(p.values) == sorted(p.values, reverse=True) and len(set(p.values)) == len(p.values), name


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_equals_published_numbers(S, name):
    np.testing.assert_allclose(S.PRESETS[name].values, PUBLISHED[name], rtol=0, atol=1e-6)


def _diffusers_reference(name: str) -> list[float]:
    """The same schedule from the diffusers scheduler configuration the preset's source uses."""
    import diffusers as d

    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    n = int(name.split("-step")[0].split()[-1])
    if name.startswith("LCM"):
        s = d.LCMScheduler(**sd, original_inference_steps=50)
    elif name.startswith("TCD"):
        s = d.TCDScheduler(**sd, original_inference_steps=50)
    elif name.startswith("SDXL-Lightning"):
        s = d.EulerDiscreteScheduler(**sd, timestep_spacing="trailing")
    elif name.startswith("Hyper-SD "):
        s = d.DDIMScheduler(**sd, timestep_spacing="trailing")
    else:
        flow = {"Qwen-Image Lightning": dict(shift=1.0, use_dynamic_shifting=True, base_shift=math.log(3),
                                             max_shift=math.log(3), time_shift_type="exponential"),
                "Z-Image-Turbo": dict(shift=3.0, use_dynamic_shifting=False),
                "Flux schnell": dict(shift=1.0, use_dynamic_shifting=False)}
        cfg = next(v for k, v in flow.items() if name.startswith(k))
        s = d.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **cfg)
        kwargs = {"mu": math.log(3)} if cfg["use_dynamic_shifting"] else {}
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n).tolist(), **kwargs)
        return s.sigmas[:-1].tolist()
    s.set_timesteps(n)
    return [float(t) for t in s.timesteps]


@pytest.mark.parametrize("name", ["LCM 4-step", "LCM 8-step", "TCD 4-step", "SDXL-Lightning 2-step",
                                  "SDXL-Lightning 4-step", "SDXL-Lightning 8-step", "Hyper-SD 4-step",
                                  "Hyper-SD 8-step", "Qwen-Image Lightning 8-step (shift 3)",
                                  "Qwen-Image Lightning 4-step (shift 3)", "Z-Image-Turbo 8-step (shift 3)",
                                  "Flux schnell 4-step"])
def test_preset_equals_the_sources_diffusers_scheduler(S, name):
    np.testing.assert_allclose(S.PRESETS[name].values, _diffusers_reference(name), rtol=1e-5, atol=1e-5)


def test_wan22_lightning_follows_lightx2v_step_list_and_shift(S):
    """LightX2V's step-distill scheduler: sigma(t) = shift(t / 1000) with shift 5 at t = 1000, 750, 500, 250."""
    shift = 5.0
    expected = [shift * (t / 1000) / (1 + (shift - 1) * t / 1000) for t in (1000, 750, 500, 250)]
    np.testing.assert_allclose(S.PRESETS["Wan 2.2 Lightning 4-step (shift 5)"].values, expected, atol=1e-9)


def test_preset_node_maps_through_the_connected_model(S):
    import comfy_tiny_models as tiny

    sd15, flux = tiny.tiny_model("sd15"), tiny.tiny_model("flux")
    sigmas = S.FewstepPresetSchedule.execute(sd15, "DMD2 SDXL 4-step")[0]
    ms = sd15.get_model_object("model_sampling")
    expected = torch.stack([ms.sigma(torch.tensor(float(t))).reshape(()) for t in (999, 749, 499, 249)])
    torch.testing.assert_close(sigmas[:-1], expected.float())
    assert float(sigmas[-1]) == 0.0 and len(sigmas) == 5
    flow = S.FewstepPresetSchedule.execute(flux, "Flux schnell 4-step")[0]
    torch.testing.assert_close(flow, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match=r"'Flux schnell 4-step' is for flow-matching models .* the connected model "
                                         r"SD15 samples with"):
        S.FewstepPresetSchedule.execute(sd15, "Flux schnell 4-step")
    with pytest.raises(ValueError, match=r"'LCM 4-step' is for discrete-timestep .* the connected model Flux "):
        S.FewstepPresetSchedule.execute(flux, "LCM 4-step")
    with pytest.raises(ValueError, match="unknown schedule preset 'nope'; choose one of"):
        S.FewstepPresetSchedule.execute(flux, "nope")


def test_templates_use_the_published_schedules(S):
    """The SD1.5 / SDXL templates' timestep lists are the presets of the distilled models they load."""
    import workflow_tools as wt

    expected = {"fewstep_sd15_lcm_lora": "LCM 4-step", "fewstep_sdxl_dmd2_4step": "DMD2 SDXL 4-step",
                "fewstep_sdxl_tcd_lora": "TCD 4-step"}
    for name, preset in expected.items():
        node = next(n for n in wt.load_api(name).values() if n["class_type"] == "FewstepTimestepSchedule")
        values = [float(v) for v in node["inputs"]["timesteps"].split(",")]
        assert values == list(S.PRESETS[preset].values), name
