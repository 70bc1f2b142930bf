"""The torch-free ONNX runtime: numpy twins of the model samplings, schedules and samplers match the torch core;
the runtime imports no torch; bad files and bad inputs give clear errors.

Cheap: the ONNX graphs here are built by hand with ``onnx.helper`` (no torch export); ``test_export.py`` covers
real exports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from fewstep.core.export import metadata as md  # noqa: E402
from fewstep.core.export import np_sampling as nps  # noqa: E402
from fewstep.core.export.runtime import OnnxDenoiser, OnnxInputError, OnnxModelError, generate  # noqa: E402
from fewstep.core.models import EDM, Denoiser, DiscreteVP, FlowMatching, GaussianMixtureDenoiser, toy_mixture  # noqa: E402
from fewstep.core.sampling import get_sampler, get_sigmas, timestep_list  # noqa: E402
from fewstep.core.sampling.registry import REGISTRY, RUNTIME_SAMPLERS  # noqa: E402

SAMPLINGS = {
    "vp-eps": lambda: DiscreteVP("eps", "scaled_linear"),
    "vp-v-linear": lambda: DiscreteVP("v", "linear", 1e-4, 0.02),
    "vp-x0-cosine": lambda: DiscreteVP("x0", "cosine"),
    "vp-v-ztsnr": lambda: DiscreteVP("v", "scaled_linear", zero_terminal_snr=True),
    "flow": lambda: FlowMatching(shift=3.0),
    "flow-flux": lambda: FlowMatching(shift=1.0, multiplier=1.0),
    "edm": lambda: EDM(0.002, 80.0, 0.5),
}


# --------------------------------------------------------------------------------- numpy twins of the core
@pytest.mark.parametrize("kind", SAMPLINGS)
def test_model_sampling_twin(kind):
    ms = SAMPLINGS[kind]()
    nm = nps.model_sampling_from_config(ms.config())
    assert nm.sigma_min == pytest.approx(ms.sigma_min, rel=1e-6)
    assert nm.sigma_max == pytest.approx(ms.sigma_max, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    sig = torch.exp(torch.empty(7).uniform_(np.log(ms.sigma_min), np.log(ms.sigma_max), generator=g))
    sig = torch.cat([sig, torch.tensor([ms.sigma_min, ms.sigma_max])]).float()
    x = torch.randn(len(sig), 2, 3, generator=g)
    out = torch.randn(len(sig), 2, 3, generator=g)
    s_np, x_np, o_np = sig.numpy(), x.numpy(), out.numpy()
    np.testing.assert_allclose(nm.timestep(s_np), ms.timestep(sig).numpy(), rtol=1e-6, atol=1e-4)
    t = ms.timestep(sig)
    np.testing.assert_allclose(nm.sigma(t.numpy()), ms.sigma(t).numpy(), rtol=1e-5)
    np.testing.assert_allclose(nm.calculate_input(s_np, x_np), ms.calculate_input(sig, x).numpy(), rtol=1e-6)
    np.testing.assert_allclose(nm.calculate_denoised(s_np, o_np, x_np), ms.calculate_denoised(sig, out, x).numpy(),
                               rtol=1e-5, atol=1e-6)
    for max_denoise in (False, True):
        np.testing.assert_allclose(nm.noise_scaling(s_np, o_np, x_np, max_denoise),
                                   ms.noise_scaling(sig, out, x, max_denoise).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["vp-eps", "vp-v-ztsnr", "flow", "edm"])
@pytest.mark.parametrize("schedule", ["simple", "uniform", "sgm_uniform", "karras", "exponential", "flow_shift"])
@pytest.mark.parametrize("steps", [1, 4, 9])
def test_schedule_twin(kind, schedule, steps):
    ms = SAMPLINGS[kind]()
    nm = nps.model_sampling_from_config(ms.config())
    np.testing.assert_allclose(nps.get_sigmas(schedule, nm, steps), get_sigmas(schedule, ms, steps).numpy(),
                               rtol=2e-5, atol=1e-6)


def test_timestep_list_twin():
    ms = DiscreteVP("eps", "scaled_linear")
    nm = nps.model_sampling_from_config(ms.config())
    ts = [999, 749, 499.5, 249]
    np.testing.assert_allclose(nps.timestep_list(nm, ts), timestep_list(ms, ts).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="strictly decreasing"):
        nps.timestep_list(nm, [10, 20])


class NpDenoiser:
    """A torch denoiser seen through numpy (what ``OnnxDenoiser`` is for an ONNX graph)."""

    def __init__(self, den):
        self.den = den
        self.model_sampling = nps.model_sampling_from_config(den.model_sampling.config())

    def __call__(self, x, sigma, **cond):
        with torch.no_grad():
            return self.den(torch.from_numpy(x), torch.from_numpy(np.asarray(sigma, np.float32)), **cond).numpy()


def _shared_noise(shape, n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _samplers_pair(noise):
    it_t, it_n = iter(noise), iter(noise)
    return (lambda s, sn: next(it_t)), (lambda s, sn: next(it_n).numpy())


@pytest.mark.parametrize("kind", ["vp-eps", "vp-v-linear", "flow", "edm"])
@pytest.mark.parametrize("sampler", RUNTIME_SAMPLERS)
def test_sampler_twin_on_exact_denoiser(kind, sampler):
    """Same update rules: every runtime sampler of the registry on numpy, on the exact Gaussian-mixture denoiser,
    equals the torch one."""
    ms = SAMPLINGS[kind]()
    den = GaussianMixtureDenoiser(toy_mixture(dim=2, components=4), ms)
    npden = NpDenoiser(den)
    sched = "flow_shift" if kind.startswith("flow") else "karras"
    sig = get_sigmas(sched, ms, 6)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    x = ms.noise_scaling(sig[0], noise, torch.zeros_like(noise))
    opts_t, opts_n = {}, {}
    if REGISTRY[sampler].ancestral:
        opts_t["noise_sampler"], opts_n["noise_sampler"] = _samplers_pair(_shared_noise((16, 2), 6))
    if sampler == "flow_map":
        opts_t["target_key"] = opts_n["target_key"] = None
    ref = get_sampler(sampler)(den, x, sig, disable=True, **opts_t).numpy()
    out = nps.get_sampler(sampler)(npden, x.numpy(), sig.numpy(), **opts_n)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", ["vp-eps", "flow"])
@pytest.mark.parametrize("sampler", [n for n, spec in REGISTRY.items() if spec.family != "composite"])
def test_every_sampler_is_written_once_for_numpy_and_torch(kind, sampler):
    """Not only the runtime's: every sampler runs on numpy arrays with the same result as on tensors (the update
    rules exist once), so offering one more in the runtime is a registry flag."""
    ms = SAMPLINGS[kind]()
    den = GaussianMixtureDenoiser(toy_mixture(dim=2, components=4), ms)
    sig = get_sigmas("flow_shift" if kind == "flow" else "karras", ms, 5)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
    x = ms.noise_scaling(sig[0], noise, torch.zeros_like(noise))
    opts_t, opts_n = {}, {}
    if REGISTRY[sampler].ancestral:
        opts_t["noise_sampler"], opts_n["noise_sampler"] = _samplers_pair(_shared_noise((8, 2), 5))
    ref = get_sampler(sampler)(den, x, sig, disable=True, **opts_t).numpy()
    out = get_sampler(sampler)(NpDenoiser(den), x.numpy(), sig.numpy(), disable=True, **opts_n)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# ----------------------------------------------------------------------------------- hand-made ONNX graphs
def _network_graph(static_batch: int | None = None, size: int = 8, guidance: str | None = None) -> onnx.ModelProto:
    """out = 0.5 x_in + (0.01 class + 0.001 timestep [+ 0.1 guidance]) per sample: every input matters."""
    b = static_batch if static_batch else "batch"
    nodes = [
        helper.make_node("Cast", ["class_labels"], ["c"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["c", "k_c"], ["c1"]),
        helper.make_node("Mul", ["timestep", "k_t"], ["t1"]),
        helper.make_node("Add", ["c1", "t1"], ["s0"]),
        helper.make_node("Reshape", ["s", "shape4"], ["s4"]),
        helper.make_node("Mul", ["x_in", "k_x"], ["xa"]),
        helper.make_node("Add", ["xa", "s4"], ["model_output"]),
    ]
    inputs = [helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [b, 1, size, size]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [b]),
              helper.make_tensor_value_info("class_labels", TensorProto.INT64, [b])]
    if guidance:
        nodes[4:4] = [helper.make_node("Mul", [guidance, "k_g"], ["g1"]), helper.make_node("Add", ["s0", "g1"], ["s"])]
        inputs.append(helper.make_tensor_value_info(guidance, TensorProto.FLOAT, [b]))
    else:
        nodes.insert(4, helper.make_node("Identity", ["s0"], ["s"]))
    inits = [helper.make_tensor("k_c", TensorProto.FLOAT, [], [0.01]),
             helper.make_tensor("k_t", TensorProto.FLOAT, [], [0.001]),
             helper.make_tensor("k_x", TensorProto.FLOAT, [], [0.5]),
             helper.make_tensor("k_g", TensorProto.FLOAT, [], [0.1]),
             helper.make_tensor("shape4", TensorProto.INT64, [4], [-1, 1, 1, 1])]
    g = helper.make_graph(nodes, "toy", inputs,
                          [helper.make_tensor_value_info("model_output", TensorProto.FLOAT, [b, 1, size, size])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


class ToyNet(torch.nn.Module):
    def forward(self, x_in, t, class_labels):
        return 0.5 * x_in + (0.01 * class_labels.float() + 0.001 * t).reshape(-1, 1, 1, 1)


def _meta(ms, sampler="dpmpp_2m", sigmas=None, **extra) -> dict:
    sig = sigmas if sigmas is not None else get_sigmas("karras", ms, 4)
    meta = {
        "format": md.FORMAT, "version": md.VERSION, "name": "toy", "graph": "network",
        "inputs": [{"name": "x_in", "role": "sample"}, {"name": "timestep", "role": "timestep"},
                   {"name": "class_labels", "role": "condition"}],
        "output": "model_output", "sample_shape": [1, 8, 8],
        "dynamic": {"batch": True, "resolution": False, "multiple": 1},
        "model_sampling": ms.config(),
        "sampler": {"name": sampler, "schedule": "karras", "steps": len(sig) - 1, "sigmas": [float(s) for s in sig],
                    "timesteps": None},
        "conditions": {"class_labels": {"dtype": "int64", "shape": ["batch"], "kind": "class_labels",
                                        "num_classes": 10, "null": 10}},
        "guidance": None, "precision": "fp32", "io_dtype": "float32",
    }
    meta.update(extra)
    return meta


def _write(path: Path, model: onnx.ModelProto, meta: dict | None) -> Path:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if meta is not None:
        helper.set_model_props(m, {md.METADATA_KEY: json.dumps(meta)})
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    ms = DiscreteVP("v", "linear", 1e-4, 0.02)
    path = _write(tmp_path_factory.mktemp("toy") / "toy.onnx", _network_graph(), _meta(ms))
    return path, Denoiser(ToyNet(), ms, name="toy")


@pytest.mark.parametrize("io_binding", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "lcm", "dmd", "onestep"])
def test_onnx_denoiser_full_sample_parity(toy, sampler, io_binding):
    path, den = toy
    model = OnnxDenoiser(path, io_binding=io_binding)
    sig = get_sigmas("karras", den.model_sampling, 4)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sig[0]
    y = torch.tensor([0, 3, 9, 10, 4])
    opts_t, opts_n = {}, {}
    if REGISTRY[sampler].ancestral:
        opts_t["noise_sampler"], opts_n["noise_sampler"] = _samplers_pair(_shared_noise(x.shape, 4))
    ref = get_sampler(sampler)(den, x, sig, extra_args={"class_labels": y}, disable=True, **opts_t).numpy()
    out = nps.get_sampler(sampler)(model, x.numpy(), sig.numpy(), extra_args={"class_labels": y.numpy()}, **opts_n)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_generate_uses_metadata_recipe(toy):
    path, den = toy
    model = OnnxDenoiser(path)
    out = generate(model, class_labels=[3, 3], seed=0)
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.float32
    again = generate(model, class_labels=[3, 3], seed=0)
    np.testing.assert_array_equal(out, again)
    assert generate(model, seed=0).shape == (10, 1, 8, 8)  # one per class by default
    assert generate(model, class_labels=[1], steps=2, schedule="uniform").shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="class labels must be in 0..9"):
        generate(model, class_labels=[11])


@pytest.mark.parametrize("convention,fed", [("fewstep", 3.0), ("lcm_omega", 2.0)])
def test_embedded_guidance_input_convention(tmp_path, convention, fed):
    """A network that takes the guidance scale itself (LCM's w-embedding, a folded guidance adapter): the runtime
    feeds the user's fewstep scale w through the stored convention (LCM's omega = w - 1)."""
    ms = DiscreteVP("x0", "linear", 1e-4, 0.02)  # x0 prediction: D(x) is the network output itself
    meta = _meta(ms, guidance={"input": "w_embed", "mode": "embedded", "convention": convention, "default": 1.5})
    meta["inputs"].append({"name": "w_embed", "role": "guidance"})
    m = OnnxDenoiser(_write(tmp_path / "g.onnx", _network_graph(guidance="w_embed"), meta))
    x, y, s = np.zeros((2, 1, 8, 8), np.float32), np.array([0, 0]), np.float32(0.0)
    t = float(m.model_sampling.timestep(s))
    np.testing.assert_allclose(m(x, s, class_labels=y, guidance_scale=3.0), 0.001 * t + 0.1 * fed, rtol=1e-5)
    default = 1.5 if convention == "fewstep" else 0.5
    np.testing.assert_allclose(m(x, s, class_labels=y), 0.001 * t + 0.1 * default, rtol=1e-5)
    w = np.array([1.0, 5.0], np.float32)  # one scale per sample
    out = m(x, s, class_labels=y, guidance_scale=w)
    fed_w = w if convention == "fewstep" else w - 1
    np.testing.assert_allclose(out[:, 0, 0, 0], 0.001 * t + 0.1 * fed_w, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- no torch
BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, _BlockTorch())
""")


def test_runtime_and_cli_import_no_torch(toy, tmp_path):
    path, _ = toy
    png = tmp_path / "grid.png"
    code = BLOCK_TORCH + textwrap.dedent(f"""
        try:
            import torch  # noqa
            raise SystemExit("torch was importable")
        except ImportError:
            pass
        import numpy as np
        from fewstep.core.export import OnnxDenoiser, generate
        from fewstep.core.export.runtime import OnnxDenoiser as D2
        from fewstep.cli import main
        m = OnnxDenoiser({str(path)!r})
        x = generate(m, class_labels=[3, 4], steps=2, sampler="lcm", schedule="karras")
        assert x.shape == (2, 1, 8, 8) and np.isfinite(x).all()
        rc = main(["run-onnx", {str(path)!r}, "--class", "3", "--steps", "4", "-o", {str(png)!r}])
        assert rc == 0, rc
        assert not any(k == "torch" or k.startswith("torch.") for k in sys.modules), "torch got imported"
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
    from PIL import Image

    assert Image.open(png).size == ((8 * (8 + 1) + 1) * 4, (1 * (8 + 1) + 1) * 4)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(toy):
    path, _ = toy
    m = OnnxDenoiser(path)
    x = np.zeros((2, 1, 8, 8), np.float32)
    y = np.array([1, 2])
    s = np.float32(1.0)
    with pytest.raises(OnnxInputError, match="must be float32, got float64"):
        m(x.astype(np.float64), s, class_labels=y)
    with pytest.raises(OnnxInputError, match=r"'class_labels' must be int64, got int32"):
        m(x, s, class_labels=y.astype(np.int32))
    with pytest.raises(OnnxInputError, match=r"must have shape \(batch, 1, 8, 8\), got \(2, 1, 9, 8\)"):
        m(np.zeros((2, 1, 9, 8), np.float32), s, class_labels=y)
    with pytest.raises(OnnxInputError, match="must have shape"):
        m(np.zeros((2, 8, 8), np.float32), s, class_labels=y)
    with pytest.raises(OnnxInputError, match="'batch' is 2 in 'x_in' but 3 in 'class_labels'"):
        m(x, s, class_labels=np.array([1, 2, 3]))
    with pytest.raises(OnnxInputError, match=r"missing \['class_labels'\]"):
        m(x, s)
    with pytest.raises(OnnxInputError, match=r"unexpected \['text'\]"):
        m(x, s, class_labels=y, text=np.zeros(2, np.float32))
    with pytest.raises(OnnxInputError, match="sigma has 3 entries"):
        m(x, np.ones(3, np.float32), class_labels=y)
    with pytest.raises(OnnxInputError, match="no guidance input"):
        m(x, s, class_labels=y, guidance_scale=2.0)
    with pytest.raises(ValueError, match="fixed 4-step schedule|no sampler"):
        generate(m, sampler="heun")
    assert isinstance(OnnxInputError("x"), ValueError) and isinstance(OnnxInputError("x"), TypeError)


def test_bad_files_give_clear_errors(tmp_path):
    ms = DiscreteVP("eps")
    with pytest.raises(FileNotFoundError):
        OnnxDenoiser(tmp_path / "missing.onnx")
    plain = _write(tmp_path / "plain.onnx", _network_graph(), None)
    with pytest.raises(OnnxModelError, match="no 'fewstep' metadata"):
        OnnxDenoiser(plain)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    with pytest.raises(OnnxModelError, match="not a valid ONNX model"):
        OnnxDenoiser(corrupt)
    good = _write(tmp_path / "good.onnx", _network_graph(), _meta(ms))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(OnnxModelError, match="not a valid ONNX model"):
        OnnxDenoiser(truncated)
    bad_json = _network_graph()
    helper.set_model_props(bad_json, {md.METADATA_KEY: "{not json"})
    onnx.save(bad_json, str(tmp_path / "badjson.onnx"))
    with pytest.raises(OnnxModelError, match="not valid JSON"):
        OnnxDenoiser(tmp_path / "badjson.onnx")
    with pytest.raises(OnnxModelError, match="newer than this fewstep"):
        OnnxDenoiser(_write(tmp_path / "v99.onnx", _network_graph(), _meta(ms, version=99)))
    meta = _meta(ms)
    meta["inputs"][2]["name"] = "labels"
    with pytest.raises(OnnxModelError, match="metadata names input 'labels'"):
        OnnxDenoiser(_write(tmp_path / "names.onnx", _network_graph(), meta))
    with pytest.raises(OnnxModelError, match="bad guidance"):
        OnnxDenoiser(_write(tmp_path / "g.onnx", _network_graph(),
                            _meta(ms, guidance={"input": "class_labels", "mode": "magic"})))


def test_cli_run_onnx_errors(tmp_path, capsys):
    from fewstep.cli import main

    plain = _write(tmp_path / "plain.onnx", _network_graph(), None)
    assert main(["run-onnx", str(plain), "-o", str(tmp_path / "g.png")]) == 2
    assert "no 'fewstep' metadata" in capsys.readouterr().err
    good = _write(tmp_path / "good.onnx", _network_graph(), _meta(DiscreteVP("eps")))
    assert main(["run-onnx", str(good), "--class", "12", "-o", str(tmp_path / "g.png")]) == 2
    assert "class labels must be in 0..9" in capsys.readouterr().err


def test_static_batch_graph_reports_fixed_dim(tmp_path):
    path = _write(tmp_path / "static.onnx", _network_graph(static_batch=2), _meta(DiscreteVP("eps")))
    m = OnnxDenoiser(path)
    with pytest.raises(OnnxInputError, match="dim 0 is fixed at 2"):
        m(np.zeros((3, 1, 8, 8), np.float32), 1.0, class_labels=np.array([1, 2, 3]))
