"""Automatic calibration of the cache indicators, saved as a small JSON per model and config.

``calibrate`` samples once at full compute (a single-evaluation sampler such as ``dpmpp_2m``, a few classes or
prompts) with recording hooks on the denoiser and on the transformer block stack, and fits:

- TeaCache's rescaling polynomial (Liu et al. 2024, arXiv:2411.19108): ``y ~ poly(x)`` where ``x`` is the relative
  L1 change between consecutive steps of an indicator signal (the network input, the timestep-modulated input of
  the first block, or the hidden state entering the cached block range) and ``y`` the relative L1 change of the
  network output, by least squares (``numpy.polyfit``) over every row and step, of the highest degree up to
  ``degree`` (4, as TeaCache) that is non-decreasing on the data's range;
- MagCache's magnitude curve (Ma et al. 2025, arXiv:2506.09045): ``L(sigma) = mean_rows log mean|r|`` of
  the residual ``r`` (network output minus input; block-stack output minus its input), so that the magnitude
  ratio between any two steps of any schedule is ``exp(L(sigma_b) - L(sigma_a))`` (MagCache's per-step ratios
  ``gamma_t``, made schedule-independent by interpolating in log sigma).

The result is keyed by the model's name and a hash of its configuration (class, diffusers config or parameter
shapes, model sampling): ``<name>--<hash>.json``. A cache that needs a calibration looks it up by both; none for
the model raises ``CalibrationMissingError`` (with the call that makes one), one for another configuration raises
``CalibrationMismatchError`` -- never another model's numbers silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .policy import rel_l1, row_mean_abs

FORMAT = "fewstep.cache.calibration"
VERSION = 1
PACKAGE_DIR = Path(__file__).resolve().parent / "calibrations"
ENV_DIR = "FEWSTEP_CALIBRATION_DIR"


class CalibrationError(ValueError):
    """A calibration is unusable for this model (base class)."""


class CalibrationMissingError(CalibrationError, LookupError):
    """No calibration exists for this model (the message says how to make one)."""


class CalibrationMismatchError(CalibrationError):
    """A calibration exists but was made for another model or configuration."""


# ------------------------------------------------------------------------------------------------ identity
def find_denoiser(model: Any) -> Any:
    """The fewstep ``Denoiser`` inside ``model`` (itself, or behind ``CFGDenoiser`` / counting wrappers), or None."""
    from ..models.denoiser import Denoiser

    probe = model
    for _ in range(8):
        if isinstance(probe, Denoiser):
            return probe
        nxt = getattr(probe, "denoiser", None) or getattr(probe, "inner_model", None)
        if nxt is None:
            return None
        probe = nxt
    return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
                if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def model_fingerprint(model: nn.Module, model_sampling: Any = None, name: str | None = None) -> tuple[str, str]:
    """``(name, config_hash)`` of a denoiser or network.

    The hash covers the network class, its diffusers ``config`` (or, without one, every parameter's name and
    shape) and the model sampling's ``config()``; not the weight values, so a fine-tune keeps its base model's
    calibration while another architecture, size or parameterisation does not.
    """
    den = find_denoiser(model)
    net = den.model if den is not None else model
    ms = model_sampling if model_sampling is not None else getattr(den, "model_sampling", None)
    name = name or (den.name if den is not None else type(net).__name__)
    cfg = getattr(net, "config", None)
    if cfg is not None and hasattr(cfg, "items"):
        arch: Any = _jsonable(dict(cfg))
    else:
        arch = [[n, list(p.shape)] for n, p in net.named_parameters()]
    ms_cfg = ms.config() if ms is not None and hasattr(ms, "config") else None
    payload = {"class": type(net).__name__, "config": arch, "model_sampling": _jsonable(ms_cfg)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return name, digest


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def calibration_filename(model_name: str, config_hash: str) -> str:
    return f"{_slug(model_name)}--{config_hash}.json"


def default_search_dirs() -> list[Path]:
    """``$FEWSTEP_CALIBRATION_DIR``, ``~/.cache/fewstep/calibrations``, then the calibrations shipped in the package."""
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append(Path(os.environ[ENV_DIR]))
    dirs.append(Path.home() / ".cache" / "fewstep" / "calibrations")
    dirs.append(PACKAGE_DIR)
    return dirs


# ------------------------------------------------------------------------------------------------ the file
@dataclass
class Calibration:
    """Fitted indicator maps of one model: TeaCache polynomials and MagCache log-magnitude curves.

    ``polys[signal]`` are ``numpy.polyfit`` coefficients (highest power first) mapping the relative L1 change of
    ``signal`` (``input``, ``modulated``, ``range_input``) to the relative L1 change of the network output, fitted on
    ``poly_range[signal]`` (extended proportionally to the input outside it).
    The per-step changes depend on the step count, so calibrate with a schedule like the one you sample with
    (``recipe`` records it). ``mag[curve]`` holds ``log_sigma`` (ascending) and ``log_norm`` for ``step`` (network
    residual) and ``blocks:<h>`` (residual of blocks ``[h, N)``).
    """

    model: str
    config_hash: str
    polys: dict[str, list[float]] = field(default_factory=dict)
    poly_range: dict[str, list[float]] = field(default_factory=dict)
    mag: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)

    def poly(self, signal: str) -> Callable[[Tensor], Tensor]:
        """TeaCache's rescaled distance for ``signal``: ``max(poly(x), 0)`` on the fitted range (where ``calibrate``
        made it non-decreasing); outside it proportional to ``x`` (polynomials extrapolate wildly): ``poly(lo) x / lo``
        below and ``poly(hi) x / hi`` above, so a change larger than any seen in calibration never looks small."""
        if signal not in self.polys:
            raise CalibrationError(
                f"calibration of {self.model!r} has no TeaCache polynomial for signal {signal!r} (it has "
                f"{sorted(self.polys)}); recalibrate with calibrate(...) on the same model (block signals need a "
                "model with a transformer_blocks list)")
        coeffs = np.asarray(self.polys[signal], dtype=np.float64)
        lo, hi = self.poly_range.get(signal, [0.0, 1.0])
        y_lo = max(float(np.polyval(coeffs, lo)), 0.0)
        y_hi = max(float(np.polyval(coeffs, np.linspace(lo, hi, 257)).max()), 0.0)  # = poly(hi) when monotone

        def rescale(x: Tensor) -> Tensor:
            xs = x.detach().double().cpu().numpy()
            y = np.clip(np.polyval(coeffs, np.clip(xs, lo, hi)), 0.0, None)
            y = np.where(xs < lo, y_lo * xs / max(lo, 1e-12), y)
            y = np.where(xs > hi, y_hi * xs / max(hi, 1e-12), y)
            return torch.as_tensor(y, dtype=torch.float32, device=x.device)

        return rescale

    def mag_curve(self, curve: str) -> Callable[[float], float]:
        """``sigma -> L(log sigma)`` by linear interpolation (clamped at the ends) for ``curve``."""
        if curve not in self.mag:
            raise CalibrationError(
                f"calibration of {self.model!r} has no MagCache curve {curve!r} (it has {sorted(self.mag)}); "
                f"recalibrate with calibrate(..., head_blocks=...) matching the cache's head_blocks")
        xs = np.asarray(self.mag[curve]["log_sigma"], dtype=np.float64)
        ys = np.asarray(self.mag[curve]["log_norm"], dtype=np.float64)

        def curve_fn(sigma: float) -> float:
            return float(np.interp(math.log(max(float(sigma), 1e-12)), xs, ys))

        return curve_fn

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> Calibration:
        if data.get("format") != FORMAT:
            raise CalibrationError(f"{source} is not a fewstep cache calibration (format {data.get('format')!r})")
        if int(data.get("version", 0)) > VERSION:
            raise CalibrationError(f"{source} has calibration format version {data['version']}; this fewstep reads "
                                   f"up to {VERSION}: upgrade fewstep or recalibrate")
        keys = {"model", "config_hash", "polys", "poly_range", "mag", "recipe", "curves"}
        return cls(**{k: v for k, v in data.items() if k in keys})

    def check(self, model_name: str | None, config_hash: str | None) -> None:
        """Raise ``CalibrationMismatchError`` unless this calibration is for ``model_name`` / ``config_hash``."""
        if model_name is not None and model_name != self.model:
            raise CalibrationMismatchError(
                f"calibration is for model {self.model!r} but the cache is applied to {model_name!r}; calibrate "
                f"this model with fewstep.core.cache.calibrate(...) instead of reusing another model's numbers")
        if config_hash is not None and config_hash != self.config_hash:
            raise CalibrationMismatchError(
                f"calibration of {self.model!r} was made for config hash {self.config_hash} but this model has "
                f"config hash {config_hash} (another size, config or model sampling); recalibrate it with "
                "fewstep.core.cache.calibrate(...) and save_calibration(...)")


def save_calibration(cal: Calibration, directory: str | Path | None = None) -> Path:
    """Write ``<directory>/<name>--<hash>.json`` atomically (default: ``$FEWSTEP_CALIBRATION_DIR`` or
    ``~/.cache/fewstep/calibrations``)."""
    out = Path(directory) if directory is not None else default_search_dirs()[0]
    out.mkdir(parents=True, exist_ok=True)
    path = out / calibration_filename(cal.model, cal.config_hash)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cal.to_dict(), indent=1))
    os.replace(tmp, path)
    return path


def read_calibration(path: str | Path) -> Calibration:
    """Load one calibration JSON file."""
    path = Path(path)
    if not path.exists():
        raise CalibrationMissingError(f"calibration file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path} is not valid JSON ({e}); delete it and recalibrate") from e
    return Calibration.from_dict(data, source=str(path))


def load_calibration(model_name: str, config_hash: str | None = None,
                     search_dirs: Sequence[str | Path] | None = None) -> Calibration:
    """Find the calibration of ``model_name`` (and ``config_hash`` if given) in ``search_dirs``.

    Raises ``CalibrationMissingError`` if there is none for the model (listing the models that have one) and
    ``CalibrationMismatchError`` if the only ones are for other config hashes.
    """
    dirs = [Path(d) for d in (search_dirs if search_dirs is not None else default_search_dirs())]
    found: list[Path] = []
    for d in dirs:
        if config_hash is not None and (d / calibration_filename(model_name, config_hash)).exists():
            cal = read_calibration(d / calibration_filename(model_name, config_hash))
            cal.check(model_name, config_hash)
            return cal
        found += sorted(d.glob(f"{_slug(model_name)}--*.json")) if d.is_dir() else []
    if found and config_hash is None:
        return read_calibration(found[0])
    if found:
        hashes = sorted({p.stem.split("--")[-1] for p in found})
        raise CalibrationMismatchError(
            f"calibrations for model {model_name!r} exist for config hash(es) {hashes} ({found[0].parent}), but this "
            f"model has config hash {config_hash} (another size, config or model sampling); recalibrate it: "
            "cal = fewstep.core.cache.calibrate(denoiser, noise, extra_args); save_calibration(cal)")
    known = sorted({p.name.split("--")[0] for d in dirs if d.is_dir() for p in d.glob("*--*.json")})
    raise CalibrationMissingError(
        f"no cache calibration for model {model_name!r} (config hash {config_hash}) in "
        f"{', '.join(map(str, dirs))}; calibrations exist for: {known or 'no model'}. Make one (one full-compute "
        "sampling run of a few classes/prompts): cal = fewstep.core.cache.calibrate(denoiser, noise, extra_args); "
        "save_calibration(cal) -- or use an indicator that needs none ('input', 'easycache', 'first_block').")


def resolve_calibration(calibration: Any, model_name: str | None, config_hash: str | None,
                        search_dirs: Sequence[str | Path] | None = None, needed_by: str = "this cache"
                        ) -> Calibration:
    """A ``Calibration`` from an object, a path or a lookup by model name + hash, checked against the model."""
    if isinstance(calibration, Calibration):
        cal = calibration
    elif isinstance(calibration, (str, Path)):
        cal = read_calibration(calibration)
    elif calibration is None:
        if model_name is None:
            raise CalibrationMissingError(
                f"{needed_by} needs a calibration but knows no model to look it up for: pass calibration=... or "
                "apply it with fewstep.core.cache.apply_cache(model, cache) (or cache.bind(model_name, config_hash))")
        cal = load_calibration(model_name, config_hash, search_dirs)
    else:
        raise TypeError(f"calibration must be a Calibration, a path or None, got {type(calibration).__name__}")
    cal.check(model_name, config_hash)
    return cal


# ------------------------------------------------------------------------------------------------ calibrate
class CalibrationRecorder:
    """Per-call measurements of one or more full-compute sampling runs, for ``fit_calibration``.

    A host (``calibrate`` here, a ComfyUI wrapper in ``nodes/caches.py``) calls ``begin(sigma)`` at each model call,
    then ``change(name, tensor, key)`` for signals whose relative L1 change between consecutive calls is wanted
    (``input``, ``output``, ``modulated``, ``range_input``) and ``norm(name, tensor)`` for residuals whose log
    magnitude is wanted (``step``, ``blocks:<h>``). ``key`` separates call sites (guidance branches called
    separately): a change is always measured against the previous call with the same key. ``new_run()`` starts
    another sampling run (changes are never measured across runs).
    """

    def __init__(self) -> None:
        self.prev: dict[Any, Tensor] = {}
        self.rows: list[dict[str, Any]] = []
        self.cur: dict[str, Any] = {}
        self.runs = 1

    def begin(self, sigma: float) -> dict[str, Any]:
        """Start the record of one model call at ``sigma``."""
        self.cur = {"sigma": float(sigma)}
        self.rows.append(self.cur)
        return self.cur

    def new_run(self) -> None:
        self.prev.clear()
        self.runs += 1

    def change(self, name: str, t: Tensor, key: Any = None) -> None:
        t = t.detach().float()
        prev = self.prev.get((name, key))
        if prev is not None and prev.shape == t.shape:
            self.cur[f"{name}_rel"] = rel_l1(t, prev).cpu()
        self.prev[(name, key)] = t

    def norm(self, name: str, t: Tensor) -> None:
        self.cur[f"{name}_norm"] = row_mean_abs(t).clamp_min(1e-12).log().mean().item()


_Recorder = CalibrationRecorder


def _polyfit(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[list[float], list[float], float]:
    """Least-squares polynomial ``y ~ poly(x)`` of the highest degree <= ``degree`` that is non-decreasing on the
    data's range (a larger input change must not predict a smaller output change; high degrees wiggle at the edges
    of noisy data). Degree 0 (the mean) if not even a line rises."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < degree + 2:
        raise CalibrationError(f"too few calibration points ({x.size}) for a degree-{degree} fit; use more steps")
    grid = np.linspace(x.min(), x.max(), 257)
    coeffs = np.array([y.mean()])
    for d in range(degree, 0, -1):
        c = np.polyfit(x, y, d)
        v = np.polyval(c, grid)
        if np.all(np.diff(v) >= -1e-9 * max(np.abs(v).max(), 1e-12)):
            coeffs = c
            break
    rmse = float(np.sqrt(np.mean((np.polyval(coeffs, x) - y) ** 2)))
    return [float(c) for c in coeffs], [float(x.min()), float(x.max())], rmse


@torch.no_grad()
def calibrate(
    model: nn.Module,
    noise: Tensor,
    extra_args: dict[str, Any] | None = None,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 50,
    schedule: str = "karras",
    sigmas: Tensor | None = None,
    guidance: Callable[[nn.Module], nn.Module] | None = None,
    head_blocks: int = 1,
    degree: int = 4,
    name: str | None = None,
) -> Calibration:
    """Run ``sampler`` once at full compute and fit the TeaCache polynomials and MagCache curves of ``model``.

    Args:
        model: a fewstep ``Denoiser`` (e.g. ``load_teacher()`` or ``diffusers_denoiser(unet)``).
        noise: unit Gaussian noise ``(B, ...)``; use a few classes / prompts (rows are pooled).
        extra_args: the conditioning (e.g. ``{"class_labels": torch.arange(10)}``).
        sampler: a single-evaluation sampler (``euler``, ``dpmpp_2m``, ``euler_ancestral``, ``lcm`` ...), so that
            consecutive calls are consecutive steps.
        steps, schedule, sigmas: the schedule (``sigmas`` overrides).
        guidance: wraps the denoiser for sampling, e.g. ``lambda d: CFGDenoiser(d, 2.0)`` (cond and uncond rows are
            pooled).
        head_blocks: the head of ``FirstBlockCache`` whose block-stack curve is recorded (``blocks:<h>``).
        degree: TeaCache polynomial degree (TeaCache uses 4).
        name: overrides the model name (default: the denoiser's ``name``).
    """
    from ..models.denoiser import unwrap_output
    from ..sampling.samplers import get_sampler
    from ..sampling.schedules import get_sigmas
    from .hooks import find_blocks, hidden_from_inputs, hidden_from_output

    den = find_denoiser(model)
    if den is None:
        raise TypeError(f"calibrate needs a fewstep Denoiser, got {type(model).__name__}; wrap the network with "
                        "fewstep.core.models.Denoiser(...) or diffusers_adapters.diffusers_denoiser(...)")
    model_name, config_hash = model_fingerprint(den, name=name)
    ms = den.model_sampling
    sig = torch.as_tensor(sigmas, dtype=torch.float32) if sigmas is not None else get_sigmas(schedule, ms, steps)
    rec = CalibrationRecorder()
    handles: list[Any] = []
    orig_call = den.call

    def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        s = args[1] if len(args) > 1 else kwargs["sigma"]
        rec.begin(float(torch.as_tensor(s).reshape(-1)[0]))

    def call(module: nn.Module, x_in: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = orig_call(module, x_in, t, **cond)
        rec.change("input", x_in)
        rec.change("output", out)
        rec.norm("step", out - x_in)
        return out

    handles.append(den.register_forward_pre_hook(pre, with_kwargs=True))
    den.call = call
    blocks = find_blocks(den.model, required=False)
    if blocks:
        if not 1 <= head_blocks < len(blocks):
            raise CalibrationError(f"head_blocks must be in [1, {len(blocks) - 1}] for {len(blocks)} blocks")
        state: dict[str, Tensor] = {}

        def range_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            h = hidden_from_inputs(blocks[head_blocks], args, kwargs)
            state["range_in"] = h
            rec.change("range_input", h)

        def last_out(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            h_out = hidden_from_output(blocks[-1], out, hidden_from_inputs(blocks[-1], args, kwargs))
            if "range_in" in state and h_out.shape == state["range_in"].shape:
                rec.norm(f"blocks:{head_blocks}", h_out - state.pop("range_in"))

        handles.append(blocks[head_blocks].register_forward_pre_hook(range_in, with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(last_out, with_kwargs=True))
        norm1 = getattr(blocks[0], "norm1", None)
        if isinstance(norm1, nn.Module):
            def modulated(_m: nn.Module, _a: tuple, out: Any) -> None:
                rec.change("modulated", out[0] if isinstance(out, (tuple, list)) else unwrap_output(out))

            handles.append(norm1.register_forward_hook(modulated))
    try:
        runner = guidance(den) if guidance is not None else den
        x = ms.noise_scaling(sig[0], noise, torch.zeros_like(noise), max_denoise=True)
        get_sampler(sampler)(runner, x, sig, extra_args=dict(extra_args or {}), disable=True)
    finally:
        for h in handles:
            h.remove()
        den.call = orig_call
    calls = len(rec.rows)
    if calls != len(sig) - 1:
        raise CalibrationError(f"sampler {sampler!r} made {calls} model calls for {len(sig) - 1} steps; calibrate "
                               "with a single-evaluation sampler (euler, dpmpp_2m, euler_ancestral)")
    cal = fit_calibration(rec, model_name, config_hash, degree=degree, curves=["step"] + (
        [f"blocks:{head_blocks}"] if blocks else []))
    cal.recipe.update({"sampler": sampler, "steps": len(sig) - 1, "schedule": schedule if sigmas is None else "custom",
                       "rows": int(noise.shape[0]), "guidance": guidance is not None, "head_blocks": head_blocks,
                       "degree": degree, "num_blocks": len(blocks) if blocks else 0})
    return cal


def fit_calibration(rec: CalibrationRecorder, model_name: str, config_hash: str, *, degree: int = 4,
                    curves: Sequence[str] = ("step",)) -> Calibration:
    """Fit TeaCache polynomials (every recorded ``<signal>_rel`` against ``output_rel``) and MagCache log-magnitude
    curves (``curves``, from ``<curve>_norm``) to a recorder's rows; see the module docstring."""
    cal = Calibration(model=model_name, config_hash=config_hash)
    target = [r.get("output_rel") for r in rec.rows]
    for signal in ("input", "modulated", "range_input"):
        pairs = [(r[f"{signal}_rel"], y) for r, y in zip(rec.rows, target) if f"{signal}_rel" in r and y is not None]
        if not pairs:
            continue
        xs = torch.cat([p[0] for p in pairs]).numpy().astype(np.float64)
        ys = torch.cat([p[1] for p in pairs]).numpy().astype(np.float64)
        coeffs, rng, rmse = _polyfit(xs, ys, degree)
        cal.polys[signal], cal.poly_range[signal] = coeffs, rng
        cal.recipe[f"poly_rmse_{signal}"] = rmse
        cal.recipe[f"poly_degree_{signal}"] = len(coeffs) - 1
        cal.curves[f"{signal}_rel"] = [float(p[0].mean()) for p in pairs]
    cal.curves["output_rel"] = [float(y.mean()) for y in target if y is not None]
    for curve in curves:
        pts = sorted((math.log(max(r["sigma"], 1e-12)), r[f"{curve}_norm"]) for r in rec.rows if f"{curve}_norm" in r)
        if pts:
            cal.mag[curve] = {"log_sigma": [p[0] for p in pts], "log_norm": [p[1] for p in pts]}
    cal.curves["sigma"] = [r["sigma"] for r in rec.rows]
    return cal
