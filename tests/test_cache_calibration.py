"""Cache calibration: fitted per model, keyed by name + config hash, clear errors when missing or mismatched."""

from __future__ import annotations

import json

import pytest
import torch

from fewstep.core.cache import (
    Calibration,
    CalibrationError,
    CalibrationMismatchError,
    CalibrationMissingError,
    FirstBlockCache,
    StepCache,
    apply_cache,
    calibrate,
    load_calibration,
    model_fingerprint,
    read_calibration,
    save_calibration,
)
from fewstep.core.cache.calibration import PACKAGE_DIR, calibration_filename
from fewstep.core.guidance import CFGDenoiser
from fewstep.core.models import DiscreteVP
from fewstep.core.models.embedded import load_teacher
from fewstep.core.sampling import get_sigmas, sample_dpmpp_2m

diffusers = pytest.importorskip("diffusers")
from fewstep.core.models.diffusers_adapters import diffusers_denoiser  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _dit(layers=3, ms=None, seed=0):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return diffusers_denoiser(m.eval(), ms)


COND = {"class_labels": torch.tensor([1, 2])}


def _calibrate(den, steps=8):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return calibrate(den, noise, COND, steps=steps, guidance=lambda d: CFGDenoiser(d, 3.0, null=10), degree=2)


@pytest.fixture(scope="module")
def dit_cal():
    den = _dit()
    return den, _calibrate(den)


def test_fingerprint_covers_config_and_sampling_not_weights():
    a, b = _dit(3), _dit(3, seed=1)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    assert model_fingerprint(a) == model_fingerprint(b) == model_fingerprint(CFGDenoiser(a, 2.0))
    assert model_fingerprint(a)[0] == "DiTTransformer2DModel"
    assert model_fingerprint(_dit(2))[1] != model_fingerprint(a)[1]
    assert model_fingerprint(_dit(3, DiscreteVP("v", "linear")))[1] != model_fingerprint(a)[1]


def test_calibrate_save_load_roundtrip(dit_cal, tmp_path):
    den, cal = dit_cal
    name, h = model_fingerprint(den)
    assert (cal.model, cal.config_hash) == (name, h)
    assert set(cal.polys) == {"input", "modulated", "range_input"} and set(cal.mag) == {"step", "blocks:1"}
    assert cal.recipe["steps"] == 8 and len(cal.curves["sigma"]) == 8
    path = save_calibration(cal, tmp_path)
    assert path.name == calibration_filename(name, h) and path.stat().st_size < 20_000
    loaded = load_calibration(name, h, [tmp_path])
    assert loaded == read_calibration(path) and loaded.to_dict() == json.loads(path.read_text())
    rescale = loaded.poly("input")
    y = rescale(torch.tensor([0.0, 0.01, 1e6]))
    assert (y >= 0).all() and torch.isfinite(y).all()  # clamped into the fitted range, never negative
    curve = loaded.mag_curve("step")
    assert curve(1e9) == pytest.approx(cal.mag["step"]["log_norm"][-1])
    # a cache applied to the same configuration finds it by name + hash
    cache = StepCache(0.1, indicator="teacache")
    with apply_cache(CFGDenoiser(_dit(3), 3.0, null=10), cache, calibration_dirs=[tmp_path]):
        pass
    assert cache.calibration == loaded
    # the same cache object later applied to another configuration looks up that one's calibration
    other = _dit(2)
    save_calibration(_calibrate(other, steps=6), tmp_path)
    with apply_cache(other, cache, calibration_dirs=[tmp_path]):
        assert cache.calibration.config_hash == model_fingerprint(other)[1] != loaded.config_hash


def test_missing_calibration_is_clear_and_offers_to_calibrate(tmp_path):
    den = _dit(3)
    with pytest.raises(CalibrationMissingError, match=r"no cache calibration for model 'DiTTransformer2DModel'.*"
                                                      r"calibrate\(denoiser"):
        apply_cache(den, StepCache(0.1, indicator="magcache"), calibration_dirs=[tmp_path])
    assert "call" not in vars(den) or den.call.__name__ == "call_dit"  # nothing left patched
    assert not den._forward_pre_hooks
    with pytest.raises(CalibrationMissingError, match="model 'nobody'.*calibrations exist for: no model"):
        load_calibration("nobody", "0" * 16, [tmp_path])
    with pytest.raises(CalibrationMissingError, match="needs a calibration but none is bound"):
        StepCache(0.1, indicator="teacache").should_compute(torch.ones(1, 2), 1.0)
    # indicators that need no calibration just work
    with apply_cache(den, FirstBlockCache(0.1), calibration_dirs=[tmp_path]):
        pass


def test_calibration_for_another_config_hash_is_an_error(dit_cal, tmp_path):
    _, cal = dit_cal
    save_calibration(cal, tmp_path)
    other = _dit(2)  # same class name, other depth
    with pytest.raises(CalibrationMismatchError, match=f"exist for config hash.*{cal.config_hash}.*this model has "
                                                       f"config hash {model_fingerprint(other)[1]}.*recalibrate"):
        apply_cache(other, StepCache(0.1, indicator="teacache"), calibration_dirs=[tmp_path])
    with pytest.raises(CalibrationMismatchError, match="was made for config hash"):
        apply_cache(other, StepCache(0.1, indicator="teacache", calibration=cal))


def test_calibration_of_another_model_is_an_error(dit_cal, tmp_path):
    _, cal = dit_cal
    renamed = Calibration(**{**cal.__dict__, "model": "someone-else"})
    path = save_calibration(renamed, tmp_path)
    with pytest.raises(CalibrationMismatchError, match="is for model 'someone-else' but the cache is applied to "
                                                       "'DiTTransformer2DModel'"):
        apply_cache(_dit(3), StepCache(0.1, indicator="magcache", calibration=path))


def test_bad_calibration_files(tmp_path, dit_cal):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        read_calibration(bad)
    bad.write_text(json.dumps({"format": "something"}))
    with pytest.raises(CalibrationError, match="not a fewstep cache calibration"):
        read_calibration(bad)
    with pytest.raises(CalibrationMissingError, match="does not exist"):
        read_calibration(tmp_path / "missing.json")
    _, cal = dit_cal
    with pytest.raises(CalibrationError, match="no TeaCache polynomial for signal 'nope'"):
        cal.poly("nope")
    with pytest.raises(CalibrationError, match="no MagCache curve 'blocks:2'.*head_blocks"):
        apply_cache(_dit(3), FirstBlockCache(0.1, indicator="magcache", head_blocks=2, calibration=cal))


def test_calibrate_needs_a_single_evaluation_sampler():
    with pytest.raises(CalibrationError, match="single-evaluation sampler"):
        calibrate(_dit(3), torch.randn(1, 4, 8, 8), {"class_labels": torch.tensor([1])}, sampler="heun", steps=3)
    with pytest.raises(TypeError, match="needs a fewstep Denoiser"):
        calibrate(torch.nn.Linear(2, 2), torch.randn(1, 2))


@torch.no_grad()
def test_shipped_teacher_calibration_is_found():
    teacher = load_teacher()
    name, h = model_fingerprint(teacher)
    assert (PACKAGE_DIR / calibration_filename(name, h)).exists(), "ship core/cache/calibrations for the teacher"
    model = CFGDenoiser(teacher, 2.0)
    sig = get_sigmas("karras", teacher.model_sampling, 10)
    x = torch.randn(2, 1, 16, 16) * sig[0]
    for cache in (StepCache(0.2, indicator="teacache"), StepCache(0.02, indicator="magcache")):
        with apply_cache(model, cache, calibration_dirs=[PACKAGE_DIR]):
            out = sample_dpmpp_2m(model, x, sig, extra_args={"class_labels": torch.tensor([3, 5])}, disable=True)
        assert torch.isfinite(out).all() and cache.calibration.model == "digits-dit-teacher"


def test_recorder_and_fit_for_other_hosts_keep_branches_and_runs_apart():
    """``CalibrationRecorder`` + ``fit_calibration`` (the ComfyUI calibration node's path): changes are measured per
    key and never across runs; the fit recovers a known input -> output change map and the magnitude curve."""
    from fewstep.core.cache import CalibrationRecorder, fit_calibration

    rec = CalibrationRecorder()
    g = torch.Generator().manual_seed(0)
    sigmas = [10.0, 6.0, 3.0, 1.5, 0.7, 0.3]
    for run in range(2):
        if run:
            rec.new_run()
        for key, scale in (((0,), 1.0), ((1,), -3.0)):  # two branches called separately at each sigma
            x = torch.randn(2, 4, 8, generator=g) * scale
            for i, s in enumerate(sigmas):
                rec.begin(s)
                x = x + torch.randn(x.shape, generator=g) * 0.05 * (i + 1) * abs(scale)
                rec.change("input", x, key)
                rec.change("output", 2 * x, key)  # output changes exactly as the input does
                rec.norm("step", torch.full_like(x, s))
    assert rec.runs == 2 and len(rec.rows) == 2 * 2 * len(sigmas)
    measured = [r for r in rec.rows if "input_rel" in r]
    assert len(measured) == 2 * 2 * (len(sigmas) - 1)  # first call of each key in each run has no predecessor
    cal = fit_calibration(rec, "host-model", "abc123", degree=2)
    xs = torch.tensor([0.05, 0.1, 0.2])
    torch.testing.assert_close(cal.poly("input")(xs), xs, rtol=1e-3, atol=1e-4)
    curve = cal.mag_curve("step")
    assert curve(3.0) == pytest.approx(torch.tensor(3.0).log().item(), abs=1e-5)
    assert cal.model == "host-model" and cal.config_hash == "abc123" and "modulated" not in cal.polys


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["polys"]["input"].__setitem__(0, float("nan")), r"polys\.input\[0\] = nan is invalid \(allowed: "
                                                                  r"finite numbers\)"),
    (lambda d: d["poly_range"]["input"].__setitem__(0, -0.1), r"poly_range\.input\[0\] = -0\.1 is invalid \(allowed: "
                                                               r"finite relative changes >= 0\)"),
    (lambda d: d["polys"].__setitem__("input", [-1.0]), r"polys\.input \(max on poly_range\) = -1\.0 is invalid "
                                                        r"\(allowed: a positive rescaled change"),
    (lambda d: d["mag"]["step"]["log_norm"].__setitem__(2, float("-inf")), r"mag\.step\.log_norm\[2\] = -inf"),
    (lambda d: d["mag"]["step"]["log_sigma"].reverse(), r"mag\.step\.log_sigma is not ascending"),
    (lambda d: d["mag"]["step"]["log_norm"].pop(), r"mag\.step\.log_norm must be 8 numbers, got list of length 7"),
    (lambda d: d["polys"]["input"].__setitem__(0, "1e3"), r"polys\.input\[0\] = str is invalid"),
])
def test_nan_negative_or_malformed_values_are_refused(dit_cal, tmp_path, edit, message):
    """NaN or negative calibration values used to switch a cache off or make it skip almost every step, silently."""
    _, cal = dit_cal
    path = save_calibration(cal, tmp_path)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=rf"calibration {path}: {message}.*; recalibrate the model") as e:
        read_calibration(path)
    assert "allowed" in str(e.value) or "must be" in str(e.value)
    with pytest.raises(CalibrationError, match=message):  # and never written in the first place
        save_calibration(Calibration(**{k: v for k, v in data.items() if k not in ("format", "version")}), tmp_path)


def test_weights_fingerprint_tells_checkpoints_apart():
    from fewstep.core.cache import weights_fingerprint

    a, b = _dit(3), _dit(3, seed=1)
    fa = weights_fingerprint(a.named_parameters())
    assert fa == weights_fingerprint(_dit(3).named_parameters()) != weights_fingerprint(b.named_parameters())
    with torch.no_grad():
        next(a.parameters()).view(-1)[0] += 1e-3  # a sampled value changed
    assert weights_fingerprint(a.named_parameters()) != fa
    assert len(fa) == 16 and model_fingerprint(a) == model_fingerprint(b)  # the config hash ignores weights
