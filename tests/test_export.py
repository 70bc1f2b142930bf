"""ONNX export: onnxruntime vs torch parity (fp32 within 1e-4 relative, fp16 within 1e-2) for the embedded teacher and
tiny diffusers UNet / DiT / Flux, full few-step samples from ORT vs the torch core samplers (same noise), CFG folded
into the graph, metadata, fp16 and external data, dynamic batch / resolution, and the CLI.

Each model is exported once per module (a few seconds each on a CPU); the cheap runtime-only checks are in
``test_export_runtime.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("diffusers")

from fewstep.core.export import export_onnx  # noqa: E402
from fewstep.core.export.exporter import default_cond  # noqa: E402
from fewstep.core.export.fp16 import convert_file_to_fp16, read_onnx_metadata  # noqa: E402
from fewstep.core.export.np_sampling import get_sampler as np_sampler  # noqa: E402
from fewstep.core.export.runtime import OnnxDenoiser, OnnxModelError, generate, resolve_sigmas  # noqa: E402
from fewstep.core.export.tiny import TINY  # noqa: E402
from fewstep.core.guidance import CFGDenoiser  # noqa: E402
from fewstep.core.models import Denoiser, GaussianMixtureDenoiser, toy_mixture  # noqa: E402
from fewstep.core.models.embedded import load_teacher  # noqa: E402
from fewstep.core.sampling import get_sampler, get_sigmas, timestep_list  # noqa: E402

DMD_TIMESTEPS = [999, 749, 499, 249]


pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_fp32_close(out, ref):
    """fp32 parity: every element within 1e-4 of the reference, relative to its largest magnitude."""
    ref = np.asarray(ref)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()  # shipped in core/models/weights: a missing file fails


@pytest.fixture(scope="module")
def files(tmp_path_factory, teacher):
    d = tmp_path_factory.mktemp("onnx")
    out = {"dir": d}
    out["fp32"] = export_onnx(teacher, d / "teacher.onnx")
    convert_file_to_fp16(d / "teacher.onnx", d / "teacher16.onnx")
    out["cfg"] = export_onnx(CFGDenoiser(teacher, 2.0, null=10), d / "teacher_cfg.onnx", sampler="dmd",
                             timesteps=DMD_TIMESTEPS)
    return out


def _noise_pair(shape, n, seed=7):
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(shape, generator=g) for _ in range(n)]
    it_t, it_n = iter(noise), iter(noise)
    return (lambda s, sn: next(it_t)), (lambda s, sn: next(it_n).numpy())


# ------------------------------------------------------------------------------------------------ teacher
def test_teacher_export_metadata(files, teacher):
    res = files["fp32"]
    assert res.max_rel_error is not None and res.max_rel_error < 1e-5
    onnx.checker.check_model(str(res.path), full_check=True)
    meta = read_onnx_metadata(res.path)
    assert meta == res.metadata
    assert meta["model_sampling"] == teacher.model_sampling.config()
    assert [i["name"] for i in meta["inputs"]] == ["x_in", "timestep", "class_labels"]
    assert meta["conditions"]["class_labels"] == {"dtype": "int64", "shape": ["batch"], "kind": "class_labels",
                                                  "num_classes": 10, "null": 10}
    assert meta["guidance"] is None and meta["precision"] == "fp32"
    assert meta["dynamic"] == {"batch": True, "resolution": False, "multiple": 2}
    assert any("PatchEmbed" in n for n in meta["notes"])
    np.testing.assert_allclose(meta["sampler"]["sigmas"], get_sigmas("karras", teacher.model_sampling, 8).numpy())
    assert (meta["sampler"]["name"], meta["sampler"]["schedule"]) == ("dpmpp_2m", "karras")
    cfg = files["cfg"].metadata
    assert cfg["guidance"] == {"input": "guidance_scale", "mode": "cfg_folded", "convention": "fewstep",
                               "default": 2.0, "cond": "class_labels"}
    assert cfg["sampler"]["timesteps"] == DMD_TIMESTEPS
    np.testing.assert_allclose(cfg["sampler"]["sigmas"],
                               timestep_list(teacher.model_sampling, DMD_TIMESTEPS).numpy(), rtol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_teacher_denoiser_parity(files, teacher, precision):
    m = OnnxDenoiser(files["dir"] / ("teacher.onnx" if precision == "fp32" else "teacher16.onnx"))
    assert m.meta["precision"] == precision
    g = torch.Generator().manual_seed(0)
    ms = teacher.model_sampling
    sig = torch.tensor([ms.sigma_max, 40.0, 5.0, 1.0, 0.3, 0.05, ms.sigma_min])
    y = torch.tensor([0, 3, 5, 7, 9, 10, 2])
    x = torch.randn(7, 1, 16, 16, generator=g) * (sig.reshape(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    with torch.no_grad():
        ref = teacher(x, sig, class_labels=y).numpy()
    out = m(x.numpy(), sig.numpy(), class_labels=y.numpy())
    if precision == "fp32":
        assert_fp32_close(out, ref)
    else:
        assert rel(out, ref) < 1e-2
        # and on the network output itself, where no c_skip term hides the error
        x_in, t = ms.calculate_input(sig, x), ms.timestep(sig).float()
        with torch.no_grad():
            net_ref = teacher.call(teacher.model, x_in, t, class_labels=y).numpy()
        assert rel(m.network(x_in.numpy(), t.numpy(), class_labels=y.numpy()), net_ref) < 1e-2


def test_fp16_graph_keeps_fragile_ops_in_fp32(files):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(files["dir"] / "teacher16.onnx")))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    F, H = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    by_op: dict[str, set[int]] = {}
    for n in g.node:
        by_op.setdefault(n.op_type, set()).add(types.get(n.input[0]))
    assert by_op["Softmax"] == {F} and by_op["LayerNormalization"] == {F} and by_op["Sin"] == {F}
    assert by_op["MatMul"] == {H}
    assert [i.type.tensor_type.elem_type for i in g.input][:2] == [F, F]
    assert g.output[0].type.tensor_type.elem_type == F
    big = [t for t in g.initializer if np.prod(t.dims) > 1000]
    assert big and all(t.data_type == H for t in big)


@pytest.mark.parametrize("sampler,steps", [("dpmpp_2m", 8), ("euler", 4), ("lcm", 4), ("dmd", 4), ("onestep", 1),
                                           ("flow_map", 3)])
def test_teacher_full_sample_parity(files, teacher, sampler, steps):
    """A whole few-step sample from onnxruntime + numpy matches the torch core sampler from the same noise."""
    m = OnnxDenoiser(files["dir"] / "teacher.onnx")
    ms = teacher.model_sampling
    sig = timestep_list(ms, DMD_TIMESTEPS) if sampler == "dmd" else get_sigmas("karras", ms, steps)
    y = torch.tensor([0, 1, 4, 8, 9])
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * sig[0]
    opts_t, opts_n = {}, {}
    if sampler in ("lcm", "dmd"):
        opts_t["noise_sampler"], opts_n["noise_sampler"] = _noise_pair(x.shape, len(sig))
    if sampler == "flow_map":
        opts_t["target_key"] = opts_n["target_key"] = None
    ref = get_sampler(sampler)(teacher, x, sig, extra_args={"class_labels": y}, disable=True, **opts_t).numpy()
    out = np_sampler(sampler)(m, x.numpy(), sig.numpy(), extra_args={"class_labels": y.numpy()}, **opts_n)
    assert_fp32_close(out, ref)


def test_teacher_fp16_full_sample(files, teacher):
    m = OnnxDenoiser(files["dir"] / "teacher16.onnx")
    sig = get_sigmas("karras", teacher.model_sampling, 8)
    y = torch.arange(5)
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * sig[0]
    ref = get_sampler("dpmpp_2m")(teacher, x, sig, extra_args={"class_labels": y}, disable=True).numpy()
    out = np_sampler("dpmpp_2m")(m, x.numpy(), sig.numpy(), extra_args={"class_labels": y.numpy()})
    assert rel(out, ref) < 2e-2


def test_cfg_folded_graph(files, teacher):
    """CFG in the graph: one pass with cond and uncond stacked, scale as an input, = CFGDenoiser at any scale."""
    m = OnnxDenoiser(files["dir"] / "teacher_cfg.onnx")
    assert m.guidance["mode"] == "cfg_folded"
    g = torch.Generator().manual_seed(3)
    sig = torch.tensor([80.0, 8.0, 2.0, 0.5])
    y = torch.tensor([1, 4, 7, 9])
    x = torch.randn(4, 1, 16, 16, generator=g) * (sig.reshape(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    for w in (1.0, 2.0, 4.5):
        with torch.no_grad():
            ref = CFGDenoiser(teacher, w, null=10)(x, sig, class_labels=y).numpy()
        assert_fp32_close(m(x.numpy(), sig.numpy(), class_labels=y.numpy(), guidance_scale=w), ref)
    with torch.no_grad():  # default scale = the exported one
        ref = CFGDenoiser(teacher, 2.0, null=10)(x, sig, class_labels=y).numpy()
    assert_fp32_close(m(x.numpy(), sig.numpy(), class_labels=y.numpy()), ref)
    ws = np.array([0.0, 1.0, 3.0, 6.0], np.float32)  # one scale per sample
    out = m(x.numpy(), sig.numpy(), class_labels=y.numpy(), guidance_scale=ws)
    for i, w in enumerate(ws):
        with torch.no_grad():
            r = CFGDenoiser(teacher, float(w), null=10)(x[i:i + 1], sig[i:i + 1], class_labels=y[i:i + 1]).numpy()
        assert_fp32_close(out[i:i + 1], r)
    # full DMD-style sample with the exported recipe vs the torch core
    sigmas = resolve_sigmas(m)
    np.testing.assert_allclose(sigmas, timestep_list(teacher.model_sampling, DMD_TIMESTEPS).numpy(), rtol=1e-6)
    xs = torch.randn(4, 1, 16, 16, generator=g) * float(sigmas[0])
    nt, nn_ = _noise_pair(xs.shape, 4)
    ref = get_sampler("dmd")(CFGDenoiser(teacher, 3.0, null=10), xs, torch.from_numpy(sigmas),
                             extra_args={"class_labels": y}, disable=True, noise_sampler=nt).numpy()
    out = np_sampler("dmd")(m, xs.numpy(), sigmas, extra_args={"class_labels": y.numpy(), "guidance_scale": 3.0},
                            noise_sampler=nn_)
    assert_fp32_close(out, ref)
    with pytest.raises(ValueError, match="fixed 4-step schedule"):
        resolve_sigmas(m, steps=2)
    assert resolve_sigmas(m, steps=2, schedule="karras").shape == (3,)


def test_cli_run_onnx_on_teacher(files, tmp_path, capsys):
    from PIL import Image

    from fewstep.cli import main

    png = tmp_path / "grid.png"
    assert main(["run-onnx", str(files["dir"] / "teacher_cfg.onnx"), "--class", "3", "--steps", "4", "--schedule",
                 "karras", "--sampler", "dpmpp_2m", "--cfg", "2.5", "--n", "4", "-o", str(png)]) == 0
    assert "4 samples" in capsys.readouterr().out
    assert Image.open(png).size == ((4 * 17 + 1) * 4, 18 * 4)
    x = generate(OnnxDenoiser(files["dir"] / "teacher.onnx"), seed=0, steps=4)
    assert x.shape == (10, 1, 16, 16) and np.isfinite(x).all()


# ------------------------------------------------------------------------------------------- tiny models
_TINY_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def tiny(kind: str, tiny_dir):
    """(denoiser, fp32 export result, fp16 path), exported once; tiny-dit goes through the CLI."""
    if kind not in _TINY_CACHE:
        den = TINY[kind]()
        path = tiny_dir / f"{kind}.onnx"
        if kind == "tiny-dit":
            from fewstep.cli import main

            assert main(["export", kind, str(path), "--sampler", "dpmpp_2m", "--steps", "3"]) == 0
            res = None
        else:
            res = export_onnx(den, path, sampler="lcm" if kind == "tiny-unet" else "euler", steps=4)
        p16 = tiny_dir / f"{kind}-fp16.onnx"
        convert_file_to_fp16(path, p16)
        _TINY_CACHE[kind] = (den, res, path, p16)
    return _TINY_CACHE[kind]


def _inputs(den, batch: int, seed: int = 0, size: tuple[int, int] | None = None):
    g = torch.Generator().manual_seed(seed)
    cond = default_cond(den.model, batch, g)
    cfg = den.model.config
    c = cfg.in_channels // 4 if type(den.model).__name__ == "FluxTransformer2DModel" else cfg.in_channels
    h, w = size or ((16, 16) if type(den.model).__name__ == "FluxTransformer2DModel" else (cfg.sample_size,) * 2)
    ms = den.model_sampling
    sig = torch.tensor([ms.percent_to_sigma(p) for p in np.linspace(0.05, 0.95, batch)])
    x = torch.randn(batch, c, h, w, generator=g) * (sig.reshape(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    if "guidance" in cond:
        cond["guidance"] = torch.full((batch,), 2.5)
    return x, sig, cond


def _np_cond(m, cond):
    out = {k: v.numpy() for k, v in cond.items() if k != "guidance"}
    if "guidance" in cond:
        out["guidance_scale"] = float(cond["guidance"][0])
    return out


@pytest.mark.parametrize("kind", list(TINY))
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tiny_diffusers_parity(kind, precision, tiny_dir):
    den, _, p32, p16 = tiny(kind, tiny_dir)
    m = OnnxDenoiser(p32 if precision == "fp32" else p16)
    x, sig, cond = _inputs(den, batch=3, seed=1)
    with torch.no_grad():
        ref = den(x, sig, **cond).numpy()
    out = m(x.numpy(), sig.numpy(), **_np_cond(m, cond))
    if precision == "fp32":
        assert_fp32_close(out, ref)
    else:
        assert rel(out, ref) < 1e-2


def test_tiny_metadata_and_dynamic_resolution(tiny_dir):
    unet, res_u, pu, _ = tiny("tiny-unet", tiny_dir)
    flux, res_f, pf, _ = tiny("tiny-flux", tiny_dir)
    _, _, pd, _ = tiny("tiny-dit", tiny_dir)
    assert res_u.metadata["dynamic"] == {"batch": True, "resolution": True, "multiple": 2}
    assert res_f.metadata["dynamic"] == {"batch": True, "resolution": True, "multiple": 2}
    assert res_f.metadata["guidance"] == {"input": "guidance", "mode": "embedded", "convention": "fewstep",
                                          "default": 3.5}
    assert res_f.metadata["conditions"]["encoder_hidden_states"]["shape"] == ["batch", "text_len", 32]
    assert res_f.metadata["model_sampling"] == {"type": "flow", "prediction": "flow", "shift": 3.0, "multiplier": 1.0}
    dit_meta = read_onnx_metadata(pd)
    assert dit_meta["dynamic"]["resolution"] is False and dit_meta["sampler"]["steps"] == 3
    for den, path, size in ((unet, pu, (24, 32)), (flux, pf, (12, 20))):
        m = OnnxDenoiser(path)
        x, sig, cond = _inputs(den, batch=2, seed=4, size=size)
        if "encoder_hidden_states" in cond:  # another text length too
            cond["encoder_hidden_states"] = torch.randn(2, 5, 32)
        with torch.no_grad():
            ref = den(x, sig, **cond).numpy()
        assert_fp32_close(m(x.numpy(), sig.numpy(), **_np_cond(m, cond)), ref)


@pytest.mark.parametrize("kind", list(TINY))
def test_tiny_full_sample_parity(kind, tiny_dir):
    den, _, path, _ = tiny(kind, tiny_dir)
    m = OnnxDenoiser(path)
    name = m.meta["sampler"]["name"]
    sig = torch.tensor(m.meta["sampler"]["sigmas"])
    x0, _, cond = _inputs(den, batch=2, seed=5)
    x = den.model_sampling.noise_scaling(sig[0], x0, torch.zeros_like(x0))
    opts_t, opts_n = {}, {}
    if name in ("lcm", "dmd"):
        opts_t["noise_sampler"], opts_n["noise_sampler"] = _noise_pair(x.shape, len(sig))
    ref = get_sampler(name)(den, x, sig, extra_args=cond, disable=True, **opts_t).numpy()
    out = np_sampler(name)(m, x.numpy(), sig.numpy(), extra_args=_np_cond(m, cond), **opts_n)
    assert_fp32_close(out, ref)


def test_export_fp16_with_external_data(tmp_path):
    den = TINY["tiny-dit"]()
    path = tmp_path / "dit16.onnx"
    res = export_onnx(den, path, fp16=True, external_data=True)
    data = tmp_path / "dit16.onnx.data"
    assert data.exists() and data.stat().st_size > 0
    assert res.metadata["precision"] == "fp16" and res.max_rel_error < 1e-2
    assert any("external data" in n for n in res.notes)
    m = OnnxDenoiser(path)
    x, sig, cond = _inputs(den, batch=2, seed=6)
    with torch.no_grad():
        ref = den(x, sig, **cond).numpy()
    assert rel(m(x.numpy(), sig.numpy(), **_np_cond(m, cond)), ref) < 1e-2
    data.unlink()
    with pytest.raises(OnnxModelError, match="external data"):
        OnnxDenoiser(path)


class BatchBranch(torch.nn.Module):
    def forward(self, x, t):
        return x * 2 if x.shape[0] == 2 else x  # a shape-dependent branch pins the batch size


def test_export_refuses_silently_static_graph(tmp_path):
    from fewstep.core.models import DiscreteVP

    den = Denoiser(BatchBranch(), DiscreteVP("eps"))
    with pytest.raises(RuntimeError, match="specialised dims|Constraints violated"):
        export_onnx(den, tmp_path / "b.onnx", sample_shape=(1, 4, 4), cond={}, dynamic_resolution=False)
    res = export_onnx(den, tmp_path / "b.onnx", sample_shape=(1, 4, 4), cond={}, dynamic_batch=False,
                      dynamic_resolution=False)
    assert res.metadata["dynamic"]["batch"] is False


def test_export_argument_errors(teacher, tmp_path):
    with pytest.raises(TypeError, match="needs a fewstep Denoiser"):
        export_onnx(GaussianMixtureDenoiser(toy_mixture()), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="batch must be >= 2"):
        export_onnx(teacher, tmp_path / "x.onnx", batch=1)
    with pytest.raises(ValueError, match="no ONNX runtime twin"):
        export_onnx(teacher, tmp_path / "x.onnx", sampler="heun")
    with pytest.raises(ValueError, match="batch size 2 as its first dim"):
        export_onnx(teacher, tmp_path / "x.onnx", cond={"class_labels": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match="CFG folding needs the condition 'text'"):
        export_onnx(CFGDenoiser(teacher, 2.0, cond_key="text"), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("extra_targets", [(), ("norm1.linear", "proj_out_1")], ids=["default", "adaln"])
def test_guidance_adapter_folded_into_graph(tmp_path, extra_targets):
    """A student with its guidance adapter (AGD) folded in: one graph, the scale is an input, = AdaptedDenoiser.
    ``adaln``: also on the DiT's adaLN modulation layers (input: the timestep + class embedding), as the shipped
    digits adapter (issue 13)."""
    adapters = pytest.importorskip("fewstep.core.guidance.adapters")
    den = TINY["tiny-dit"]()
    adapter = adapters.GuidanceAdapter(den.model, rank=2, seed=0,
                                       targets=tuple(adapters.DEFAULT_TARGETS) + tuple(extra_targets))
    assert len(adapter.target_names) > len(adapters.find_targets(den.model, adapters.DEFAULT_TARGETS)) or \
        not extra_targets
    with torch.no_grad():  # trained-looking adapter: non-zero up projections and gates (about a 10% effect)
        g = torch.Generator().manual_seed(0)
        for p in adapter.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model = adapters.AdaptedDenoiser(den, adapter, default_scale=3.0)
    res = export_onnx(model, tmp_path / "adapted.onnx", sampler="euler", steps=3)
    assert res.metadata["guidance"] == {"input": "guidance_scale", "mode": "embedded", "convention": "fewstep",
                                        "default": 3.0, "adapter": True}
    m = OnnxDenoiser(res.path)
    x, sig, cond = _inputs(den, batch=3, seed=8)
    w = torch.tensor([1.0, 2.5, 6.0])
    with torch.no_grad():
        ref = model(x, sig, guidance_scale=w, **cond).numpy()
        plain = den(x, sig, **cond).numpy()
    out = m(x.numpy(), sig.numpy(), guidance_scale=w.numpy(), **_np_cond(m, cond))
    assert_fp32_close(out, ref)
    assert rel(ref[1:], plain[1:]) > 1e-3  # the adapter really acts (w != 1)
    np.testing.assert_allclose(ref[0], plain[0], rtol=1e-5, atol=1e-5)  # and is off at w = 1 (zero_at_unit_scale)
    with torch.no_grad():
        ref3 = model(x, sig, **cond).numpy()  # default scale
    assert_fp32_close(m(x.numpy(), sig.numpy(), **_np_cond(m, cond)), ref3)


def test_cli_exports_a_distilled_student_file(tmp_path, capsys):
    """`fewstep export student.safetensors out.onnx`: the student keeps the sampler and sigmas it was trained for."""
    students = pytest.importorskip("fewstep.core.models.students")
    from fewstep.cli import main
    from fewstep.core.models.embedded import save_model

    den = TINY["tiny-dit"]()
    sig = [float(s) for s in timestep_list(den.model_sampling, [999, 499])]
    cfg = {k: v for k, v in dict(den.model.config).items() if not k.startswith("_")}
    path = tmp_path / "student.safetensors"
    save_model(den.model, path, {"method": "dmd2", "architecture": "diffusers.DiTTransformer2DModel", "config": cfg,
                                 "model_sampling": den.model_sampling.config(), "sampler": "dmd", "sigmas": sig,
                                 "sampler_extra": {}})
    assert students.read_metadata(path)["method"] == "dmd2"
    out = tmp_path / "student.onnx"
    assert main(["export", str(path), str(out)]) == 0
    assert "dmd 2 steps custom" in capsys.readouterr().out
    m = OnnxDenoiser(out)
    np.testing.assert_allclose(resolve_sigmas(m), sig, rtol=1e-6)
    x = generate(m, class_labels=[1, 2], seed=0)
    assert x.shape == (2, 4, 8, 8) and np.isfinite(x).all()
