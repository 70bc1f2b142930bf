"""Sample a fewstep ONNX export with numpy + onnxruntime only (no torch on the device).

``OnnxDenoiser`` is the denoiser convention ``D(x, sigma, **cond) -> x0`` (Karras et al. 2022, eq. 7) around an
exported network: it reads the fewstep metadata, scales the input and maps sigma to the network's timestep with
the numpy model sampling, runs the graph (CUDA execution provider with IO binding when available, CPU otherwise)
and turns the native output into x0. The samplers of ``np_sampling`` (LCM, DMD multistep, flow map / Euler,
one-step, DPM-Solver++(2M)) take it exactly as the torch samplers take a ``Denoiser``; ``generate`` runs the
exported default recipe::

    from fewstep.core.export.runtime import OnnxDenoiser, generate
    model = OnnxDenoiser("student.onnx")
    images = generate(model, class_labels=[3] * 8, steps=4, seed=0)   # (8, C, H, W) float32 in model space
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the fewstep ONNX runtime needs onnxruntime: pip install 'fewstep[onnx]' "
                      "(or 'fewstep[onnx-gpu]' for CUDA)") from e

from ..checks import CFG_RANGE, check_class_labels, check_scale
from . import metadata as md
from . import np_sampling as nps
from .metadata import OnnxModelError

__all__ = ["OnnxDenoiser", "OnnxInputError", "OnnxModelError", "default_providers", "generate", "grid_uint8",
           "resolve_sigmas"]

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class OnnxInputError(TypeError, ValueError):
    """An input has the wrong shape, dtype or name for the exported graph."""


def default_providers() -> list[str]:
    """CUDA (then CPU as fallback) when this onnxruntime build has it, else CPU."""
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def _shape_str(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


class OnnxDenoiser:
    """``D(x, sigma, **cond) -> x0`` on onnxruntime for a file written by ``fewstep.core.export.export_onnx``.

    Args:
        path: the ``.onnx`` file (its ``.data`` file next to it for external data).
        providers: onnxruntime execution providers (default: CUDA when available, then CPU).
        io_binding: bind inputs/outputs explicitly (default: on for CUDA, where it saves an output allocation and
            copy per step; it also works on CPU).
        threads: intra-op threads (default: onnxruntime's choice).
        device_id: CUDA device.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, io_binding: bool | None = None,
                 threads: int | None = None, device_id: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=list(providers or default_providers()))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            msg = (f"cannot load {self.path}: not a valid ONNX model, or its external data ({self.path.name}.data) is "
                   f"missing or truncated. onnxruntime says: {first}")
            raise OnnxModelError(msg) from None
        text = self.session.get_modelmeta().custom_metadata_map.get(md.METADATA_KEY)
        self.meta: dict[str, Any] = md.parse(text, str(self.path))
        self.model_sampling = nps.model_sampling_from_config(self.meta["model_sampling"])
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        for spec in self.meta["inputs"]:
            if spec["name"] not in self._inputs:
                raise OnnxModelError(f"{self.path}: metadata names input {spec['name']!r} but the graph has "
                                     f"{list(self._inputs)}")
        self.output = self.meta["output"]
        self.providers = self.session.get_providers()
        self.on_cuda = self.providers[0] == "CUDAExecutionProvider"
        self.io_binding = self.on_cuda if io_binding is None else bool(io_binding)
        self.device_id = device_id
        roles = {i["name"]: i["role"] for i in self.meta["inputs"]}
        self.sample_input, self.timestep_input = self.meta["inputs"][0]["name"], self.meta["inputs"][1]["name"]
        self.condition_names = [n for n, r in roles.items() if r == "condition"]
        self.guidance: dict[str, Any] | None = self.meta.get("guidance")
        self.target_input = next((n for n, r in roles.items() if r == "target"), None)

    # ------------------------------------------------------------------------------------------------ info
    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.stem)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["sample_shape"])

    @property
    def conditions(self) -> dict[str, dict[str, Any]]:
        return dict(self.meta.get("conditions") or {})

    def __repr__(self) -> str:
        return (f"OnnxDenoiser({self.name!r}, {self.meta['model_sampling'].get('type')}/"
                f"{self.meta['model_sampling'].get('prediction')}, {self.meta.get('precision')}, "
                f"providers={self.providers})")

    # ---------------------------------------------------------------------------------------------- checks
    def _check(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self._inputs if n not in feeds]
        extra = [n for n in feeds if n not in self._inputs]
        if missing or extra:
            raise OnnxInputError(f"{self.name}: graph inputs are {list(self._inputs)}; missing {missing}, "
                                 f"unexpected {extra}")
        out: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[int, str]] = {}
        for name, value in feeds.items():
            spec = self._inputs[name]
            want = _NP_DTYPES.get(spec.type)
            if not isinstance(value, np.ndarray):
                value = np.asarray(value, dtype=want)
            if want is not None and value.dtype != want:
                raise OnnxInputError(f"{self.name}: input {name!r} must be {np.dtype(want).name}, got "
                                     f"{value.dtype.name} (cast with .astype(np.{np.dtype(want).name}))")
            if value.ndim != len(spec.shape):
                raise OnnxInputError(f"{self.name}: input {name!r} must have shape {_shape_str(spec.shape)}, got "
                                     f"{_shape_str(value.shape)}")
            for d, (want_d, got) in enumerate(zip(spec.shape, value.shape)):
                if isinstance(want_d, int) and want_d != got:
                    raise OnnxInputError(f"{self.name}: input {name!r} must have shape {_shape_str(spec.shape)}, "
                                         f"got {_shape_str(value.shape)} (dim {d} is fixed at {want_d})")
                if isinstance(want_d, str) and want_d:
                    prev = symbols.setdefault(want_d, (got, name))
                    if prev[0] != got:
                        raise OnnxInputError(f"{self.name}: dim {want_d!r} is {prev[0]} in {prev[1]!r} but {got} in "
                                             f"{name!r}")
            out[name] = np.ascontiguousarray(value)
        x = out[self.sample_input]
        mult = int(self.meta.get("dynamic", {}).get("multiple") or 1)
        if self.meta.get("dynamic", {}).get("resolution") and (x.shape[-2] % mult or x.shape[-1] % mult):
            raise OnnxInputError(f"{self.name}: height and width must be multiples of {mult}, got {x.shape[-2:]}")
        return out

    # ----------------------------------------------------------------------------------------------- calls
    def run_outputs(self, outputs: Sequence[str], x_in: np.ndarray, timestep: np.ndarray,
                    **inputs: Any) -> list[np.ndarray]:
        """Run the raw graph for the named ``outputs`` (the native output and, for the cached runtimes, feature
        outputs), inputs checked first; an onnxruntime failure is re-raised naming the graph and the input shapes."""
        feeds = self._check({self.sample_input: x_in, self.timestep_input: timestep, **inputs})
        try:
            if self.io_binding:
                binding = self.session.io_binding()
                for k, v in feeds.items():
                    binding.bind_cpu_input(k, v)
                for name in outputs:
                    binding.bind_output(name, "cuda" if self.on_cuda else "cpu", self.device_id)
                self.session.run_with_iobinding(binding)
                return binding.copy_outputs_to_cpu()
            return self.session.run(list(outputs), feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
            shapes = {k: v.shape for k, v in feeds.items()}
            raise RuntimeError(f"{self.name}: onnxruntime failed on inputs {shapes}: {str(e)[:500]}") from e

    def network(self, x_in: np.ndarray, timestep: np.ndarray, **inputs: Any) -> np.ndarray:
        """Run the raw graph: ``(x_in, timestep, conditions...) -> native output``, inputs checked first."""
        return self.run_outputs([self.output], x_in, timestep, **inputs)[0]

    def __call__(self, x: np.ndarray, sigma: Any, **cond: Any) -> np.ndarray:
        """``D(x, sigma, **cond) -> x0``. ``cond`` holds the graph's conditions (e.g. ``class_labels``) and, for a
        graph with a guidance input, ``guidance_scale`` in fewstep's convention (default: the exported one)."""
        cond.pop("seed", None)
        scale = cond.pop("guidance_scale", None)
        if not isinstance(x, np.ndarray) or x.ndim < 2:
            raise OnnxInputError(f"{self.name}: x must be a batched numpy array (B, C, H, W), got "
                                 f"{type(x).__name__} {getattr(x, 'shape', '')}")
        if x.dtype != np.float32:
            raise OnnxInputError(f"{self.name}: x must be float32, got {x.dtype} (cast with .astype(np.float32))")
        b = x.shape[0]
        sigma = np.asarray(sigma, dtype=np.float32).reshape(-1)
        if sigma.size == 1:
            sigma = np.repeat(sigma, b)
        if sigma.shape[0] != b:
            raise OnnxInputError(f"{self.name}: sigma has {sigma.shape[0]} entries but x has batch size {b}")
        ms = self.model_sampling
        inputs = dict(cond)
        if self.guidance is not None:
            gname = self.guidance["input"]
            w = self.guidance.get("default", 1.0) if scale is None else scale
            check_scale(w, self.guidance.get("scale_range") or CFG_RANGE, "guidance scale",
                        f"the range {self.name} was trained for" if self.guidance.get("scale_range")
                        else "the usual CFG range (1 = no guidance)")
            w = np.asarray(w, dtype=np.float32).reshape(-1)
            if w.size == 1:
                w = np.full(b, md.guidance_scale_to_input(self.guidance, float(w[0])), np.float32)
            else:
                w = np.array([md.guidance_scale_to_input(self.guidance, float(v)) for v in w], np.float32)
            inputs[gname] = w
        elif scale is not None and scale != 1.0:
            raise OnnxInputError(f"{self.name} has no guidance input; export it with CFG folded (a CFGDenoiser) or a "
                                 "guidance input to use guidance_scale")
        out = self.network(ms.calculate_input(sigma, x), ms.timestep(sigma).astype(np.float32), **inputs)
        if not np.isfinite(out).all():
            if not (np.isfinite(x).all() and np.isfinite(sigma).all()):
                raise FloatingPointError(f"{self.name}: the input x or sigma holds NaN/inf "
                                         f"(sigma={sigma[:4].tolist()}); check what produced it")
            raise FloatingPointError(f"{self.name} produced NaN/inf at sigma={sigma[:4].tolist()} from finite inputs "
                                     "(fp16 overflow? try the fp32 export)")
        return ms.calculate_denoised(sigma, out, x)


# ---------------------------------------------------------------------------------------------- generation
def resolve_sigmas(model: OnnxDenoiser, steps: int | None = None, schedule: str | None = None) -> np.ndarray:
    """The exported sigmas when ``steps``/``schedule`` match the export, else a named schedule in numpy."""
    sm = model.meta["sampler"]
    if schedule is None and (steps is None or steps == sm["steps"]):
        return np.asarray(sm["sigmas"], dtype=np.float32)
    schedule = schedule or sm["schedule"]
    if schedule in ("custom", "timesteps"):
        fixed = sm.get("timesteps") or [round(s, 4) for s in sm["sigmas"]]
        raise ValueError(f"{model.name} was exported with a fixed {sm['steps']}-step schedule ({schedule} {fixed}); "
                         f"to sample with {steps} steps pass a named schedule ({', '.join(md.RUNTIME_SCHEDULES)})")
    return nps.get_sigmas(schedule, model.model_sampling, int(steps or sm["steps"]))


def generate(model: OnnxDenoiser, n: int | None = None, *, class_labels: Sequence[int] | np.ndarray | None = None,
             steps: int | None = None, sampler: str | None = None, schedule: str | None = None,
             sigmas: Sequence[float] | np.ndarray | None = None, guidance_scale: float | None = None,
             cond: Mapping[str, np.ndarray] | None = None, seed: int | None = 0, height: int | None = None,
             width: int | None = None, noise: np.ndarray | None = None,
             callback: Callable[[dict], None] | None = None) -> np.ndarray:
    """Sample with the exported (or the given) sampler and schedule; returns x0 ``(n, C, H, W)`` float32.

    Class-conditional graphs get ``class_labels`` (default: 0, 1, 2, ... cycling over the classes); other
    conditions come in ``cond``. The start is ``noise_scaling(sigmas[0], noise)`` with ComfyUI's ``max_denoise``
    rule (a VP model at its largest sigma starts from ``sqrt(1 + sigma^2) * noise``).
    """
    meta_s = model.meta["sampler"]
    name = sampler or meta_s["name"]
    fn = nps.get_sampler(name)
    sig = nps.check_sigmas(sigmas) if sigmas is not None else resolve_sigmas(model, steps, schedule)
    extra: dict[str, Any] = {k: np.asarray(v) for k, v in (cond or {}).items()}
    conds = model.conditions
    if class_labels is not None:
        if "class_labels" not in conds:
            raise ValueError(f"{model.name} is not class-conditional (conditions: {list(conds) or 'none'})")
        extra["class_labels"] = np.asarray(class_labels).reshape(-1)  # dtype checked below
    elif "class_labels" in conds and "class_labels" not in extra:
        k = int(conds["class_labels"].get("num_classes") or 10)
        extra["class_labels"] = np.arange(n or k, dtype=np.int64) % k
    if "class_labels" in extra:
        info, y = conds["class_labels"], extra["class_labels"]
        hi = info.get("num_classes")
        if hi is not None:
            extra["class_labels"] = check_class_labels(y, n if n and y.size != 1 else None, int(hi),
                                                       int(info["null"]) if "null" in info else None)
        else:
            extra["class_labels"] = check_class_labels(y, None, 2**62)
    batch = n or next((len(v) for v in extra.values() if np.ndim(v) > 0), None) or 1
    for k, v in extra.items():
        if np.ndim(v) == 1 and len(v) == 1 and batch > 1:
            extra[k] = np.repeat(v, batch)
    missing = [c for c in model.condition_names if c not in extra and c != model.target_input]
    if missing:
        raise ValueError(f"{model.name} needs the conditions {missing} (pass cond={{...}}; shapes in "
                         f"model.conditions)")
    c, h, w = model.sample_shape
    if height or width:
        if not model.meta["dynamic"].get("resolution") and (height or h, width or w) != (h, w):
            raise ValueError(f"{model.name} was exported at a fixed {h}x{w} resolution")
        h, w = height or h, width or w
    rng = np.random.default_rng(seed)
    if noise is None:
        noise = rng.standard_normal((batch, c, h, w), dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    ms = model.model_sampling
    max_denoise = math.isclose(ms.sigma_max, float(sig[0]), rel_tol=1e-5) or float(sig[0]) > ms.sigma_max
    x = ms.noise_scaling(sig[0], noise, np.zeros_like(noise), max_denoise=max_denoise).astype(np.float32)
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    kwargs: dict[str, Any] = {"disable": True}
    if name in nps.STOCHASTIC:
        kwargs["noise_sampler"] = lambda s, sn: rng.standard_normal(x.shape, dtype=np.float32)
    if name == "flow_map":
        kwargs["target_key"] = model.target_input
    return fn(model, x, sig, extra_args=extra, callback=callback, **kwargs)


def grid_uint8(images: np.ndarray, nrow: int = 8, scale: int = 4, padding: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images in ``[-1, 1]`` into one uint8 ``(H', W')`` (grey) or ``(H', W', 3)`` array,
    as ``core.models.grid.to_uint8_grid`` does (save with PIL: ``Image.fromarray(grid).save("grid.png")``)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images must be (N, 1|3, H, W) with N >= 1, got {x.shape}")
    n, c, h, w = x.shape
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    grid = np.full((c, rows * (h + padding) + padding, ncol * (w + padding) + padding), -1.0, np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    u8 = np.round((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)
    u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
    return u8[0] if c == 1 else np.ascontiguousarray(u8.transpose(1, 2, 0))
