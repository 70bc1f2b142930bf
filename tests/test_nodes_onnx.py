"""ONNX nodes (nodes/onnx.py) in-process with the real ComfyUI 0.3.75: export a digits MODEL, load the file back as
a MODEL, and sample both through ComfyUI's CFGGuider + SamplerCustomAdvanced with fewstep's sampler nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("one_thread")]

STUDENT = "digits_consistency_4step"
STUDENT_TIMESTEPS = "999,749.25,499.5,249.75"


@pytest.fixture(scope="module")
def cn(comfy_root, tmp_path_factory):
    """ComfyUI and fewstep node modules, with ComfyUI's output folder in a temp dir (restored afterwards)."""
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as custom_sampler
    import folder_paths

    from fewstep.nodes import embedded, embedded_model, samplers, schedules
    from fewstep.nodes import onnx as onnx_nodes

    old = folder_paths.get_output_directory()
    out = tmp_path_factory.mktemp("comfy_output")
    folder_paths.set_output_directory(str(out))
    yield type("Comfy", (), dict(samplers=comfy.samplers, cs=custom_sampler, E=embedded, EM=embedded_model,
                                 S=samplers, Sch=schedules, O=onnx_nodes, out=out, fp=folder_paths))
    folder_paths.set_output_directory(old)


def _model(cn, name: str):
    return cn.E.FewstepDigitsModelLoader.execute(name)[0]


def _sample(cn, model, sampler, sigmas, digit=3, batch=3, seed=0, cfg=1.0):
    pos, neg = cn.E.FewstepDigitsClassCondition.execute(digit)
    latent = cn.E.FewstepDigitsEmptyLatent.execute(batch)[0]
    guider = cn.cs.CFGGuider.execute(model, pos, neg, cfg)[0]
    noise = cn.cs.RandomNoise.execute(seed)[0]
    return cn.cs.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)[0]["samples"]


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _export(cn, model, prefix, sampler="euler", schedule="from sigmas input", steps=4, cfg=1.0, fp16=False,
            sigmas=None):
    out = cn.O.FewstepOnnxExport.execute(model, prefix, sampler, schedule, steps, cfg, fp16, sigmas)
    return Path(out[0])


def test_student_export_and_loader_sample_like_the_torch_model(cn):
    """Consistency student: export (recipe = its distilled timesteps) -> loader -> CFGGuider(cfg 1) +
    SamplerCustomAdvanced with the flow-map sampler == the torch MODEL, and the file carries the recipe."""
    from fewstep.core.export.runtime import OnnxDenoiser

    model = _model(cn, STUDENT)
    sigmas = cn.Sch.FewstepTimestepSchedule.execute(model, STUDENT_TIMESTEPS, "timestep")[0]
    path = _export(cn, model, "fewstep/onnx/student", sampler="euler", sigmas=sigmas)
    assert path.is_file() and path.parent == cn.out / "fewstep" / "onnx" and path.name == "student_00001_.onnx"
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]
    onnx.checker.check_model(str(path), full_check=True)
    meta = OnnxDenoiser(path).meta
    assert meta["sampler"]["name"] == "euler" and meta["sampler"]["schedule"] == "custom"
    torch.testing.assert_close(torch.tensor(meta["sampler"]["sigmas"]), sigmas.float(), rtol=1e-6, atol=0)
    assert meta["model_sampling"] == {"type": "discrete_vp", "prediction": "v", "beta_schedule": "linear",
                                      "linear_start": 1e-4, "linear_end": 0.02, "timesteps": 1000,
                                      "zero_terminal_snr": False}
    # a second export gets the next counter; the loader lists both under the output folder
    assert _export(cn, model, "fewstep/onnx/student", sigmas=sigmas).name == "student_00002_.onnx"
    assert "fewstep/onnx/student_00001_.onnx [output]" in cn.O.onnx_choices()

    loaded = cn.O.FewstepOnnxLoader.execute("fewstep/onnx/student_00001_.onnx [output]", 0.0, 1)[0]
    ms_t, ms_o = model.get_model_object("model_sampling"), loaded.get_model_object("model_sampling")
    torch.testing.assert_close(ms_o.sigmas, ms_t.sigmas)
    sampler = cn.S.FewstepSamplerFlowMap.execute()[0]
    ref = _sample(cn, model, sampler, sigmas, digit=4)
    out = _sample(cn, loaded, sampler, sigmas, digit=4)
    err = _rel(out, ref)
    assert err < 1e-4, f"ONNX MODEL vs torch MODEL: relative error {err:.2e}"
    print(f"\nconsistency student, flow-map 4 steps: ONNX vs torch relative error {err:.2e}")


def test_teacher_with_cfg_in_comfy_and_cfg_folded_in_the_graph(cn):
    """Teacher: the ONNX MODEL at CFGGuider cfg 2 (two branches per step) == torch; a graph with CFG 2 folded in,
    sampled at cfg 1 (one ONNX call per step), == the torch model at cfg 2; 'path' input from the export node."""
    model = _model(cn, "digits_dit_teacher")
    sigmas = cn.cs.BasicScheduler.execute(model, "karras", 4, 1.0)[0]
    sampler = cn.S.FewstepSamplerTeacher.execute("dpmpp_2m")[0]
    ref = _sample(cn, model, sampler, sigmas, digit=7, cfg=2.0, seed=3)

    plain = _export(cn, model, "teacher", sampler="dpmpp_2m", schedule="karras", steps=8)
    loaded = cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0, path=str(plain))[0]  # the export node's output
    out = _sample(cn, loaded, sampler, sigmas, digit=7, cfg=2.0, seed=3)
    err = _rel(out, ref)
    assert err < 1e-4, err

    folded = _export(cn, model, "teacher_cfg", sampler="dpmpp_2m", schedule="karras", steps=8, cfg=2.0)
    one_pass = cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0, path=folded.name)[0]  # output-relative
    out2 = _sample(cn, one_pass, sampler, sigmas, digit=7, cfg=1.0, seed=3)
    err2 = _rel(out2, ref)
    assert err2 < 1e-4, err2
    # the loader's guidance_scale changes the folded scale: cfg 1 in the graph is the conditional model alone
    cond_only = cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 1.0, 0, path=str(folded))[0]
    ref1 = _sample(cn, model, sampler, sigmas, digit=7, cfg=1.0, seed=3)
    assert _rel(_sample(cn, cond_only, sampler, sigmas, digit=7, cfg=1.0, seed=3), ref1) < 1e-4
    assert _rel(ref1, ref) > 1e-2
    print(f"\nteacher dpmpp_2m cfg 2: ONNX vs torch {err:.2e}; CFG folded in the graph {err2:.2e}")


def test_fp16_export_is_close(cn):
    model = _model(cn, cn.EM.RANDOM_NAME)
    sigmas = cn.Sch.FewstepTimestepSchedule.execute(model, "999,499", "timestep")[0]
    path = _export(cn, model, "random16", sampler="lcm", fp16=True, sigmas=sigmas)
    loaded = cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0, path=str(path))[0]
    sampler = cn.S.FewstepSamplerLCM.execute()[0]
    err = _rel(_sample(cn, loaded, sampler, sigmas), _sample(cn, model, sampler, sigmas))
    assert 0 < err < 2e-2, err


def test_bad_files_and_models_give_clear_errors(cn, tmp_path):
    import comfy_tiny_models as tiny
    from onnx import TensorProto, helper

    from fewstep.core.export import OnnxModelError

    # a plain ONNX file without fewstep metadata
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    (cn.out / "plain.onnx").write_bytes(plain.SerializeToString())
    with pytest.raises(OnnxModelError, match="has no 'fewstep' metadata"):
        cn.O.FewstepOnnxLoader.execute("plain.onnx [output]", 0.0, 0)
    # a corrupt file
    (cn.out / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(OnnxModelError, match="cannot load .*corrupt.onnx: not a valid ONNX model"):
        cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0, path="corrupt.onnx")
    # missing files, and paths outside the allowed folders
    with pytest.raises(FileNotFoundError, match="ONNX file not found"):
        cn.O.FewstepOnnxLoader.execute("nope.onnx [output]", 0.0, 0)
    with pytest.raises(FileNotFoundError, match="not found in the 'fewstep_onnx' model folders"):
        cn.O.FewstepOnnxLoader.execute("nope.onnx", 0.0, 0)
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(plain.SerializeToString())
    with pytest.raises(ValueError, match="outside the ComfyUI output folder"):
        cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0, path=str(outside))
    with pytest.raises(ValueError, match="outside the ComfyUI output folder"):
        cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0, path="../" * 8 + str(outside))
    with pytest.raises(ValueError, match="no path is connected"):
        cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0)
    # a model the exporter does not know: named, and nothing is written
    before = sorted(cn.out.rglob("*"))
    sd15 = tiny.tiny_model("sd15")
    with pytest.raises(ValueError, match="supports the embedded digits models; this MODEL is BaseModel with "
                                         "diffusion model UNetModel"):
        _export(cn, sd15, "sd15", schedule="karras")
    with pytest.raises(ValueError, match="no SIGMAS are connected"):
        _export(cn, _model(cn, cn.EM.RANDOM_NAME), "nosigmas")
    assert sorted(cn.out.rglob("*")) == before


def test_loader_lists_the_models_folder(cn, tmp_path):
    """Files in a folder registered as 'fewstep_onnx' (like models/onnx) are offered by name."""
    model = _model(cn, cn.EM.RANDOM_NAME)
    path = _export(cn, model, "listed", sampler="dpmpp_2m", schedule="karras", steps=4)
    folder = tmp_path / "onnx_models"
    folder.mkdir()
    (folder / "mine.onnx").write_bytes(path.read_bytes())
    cn.fp.add_model_folder_path(cn.O.FOLDER, str(folder))
    try:
        choices = cn.O.onnx_choices()
        assert choices[0] == cn.O.FROM_PATH and "mine.onnx" in choices
        loaded = cn.O.FewstepOnnxLoader.execute("mine.onnx", 0.0, 0)[0]
        assert cn.O.FewstepOnnxLoader.execute(cn.O.FROM_PATH, 0.0, 0, path=str(folder / "mine.onnx"))[0] is not None
    finally:
        cn.fp.folder_names_and_paths[cn.O.FOLDER][0].remove(str(folder))
    sigmas = cn.cs.BasicScheduler.execute(model, "karras", 2, 1.0)[0]
    sampler = cn.S.FewstepSamplerTeacher.execute("euler")[0]
    assert _rel(_sample(cn, loaded, sampler, sigmas, batch=2), _sample(cn, model, sampler, sigmas, batch=2)) < 1e-4
