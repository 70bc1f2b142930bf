"""Model samplings, schedules and few-step samplers in numpy: the torch-free twin of ``core.models.model_sampling``,
``core.sampling.schedules`` and ``core.sampling.samplers`` (imports numpy only).

The formulas are the same lines as the torch modules, in float32 where they are float32 there, so an ONNX graph of
the raw network sampled here matches the torch denoiser sampled by the core samplers (``tests/test_export_runtime``
checks every sampler and schedule against the torch ones on the Gaussian-mixture ground truth).

A *model* here is any callable ``model(x, sigma, **cond) -> x0`` on numpy arrays with a ``model_sampling``
attribute (``runtime.OnnxDenoiser``), i.e. the k-diffusion / EDM denoiser convention (Karras et al. 2022, eq. 7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

F32 = np.float32
NoiseSampler = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _bcast(sigma: Any, like: np.ndarray) -> np.ndarray:
    s = np.asarray(sigma, dtype=like.dtype)
    if s.ndim == 0:
        return s
    return s.reshape(s.shape[:1] + (1,) * (like.ndim - 1))


# ------------------------------------------------------------------------------------------ model samplings
class NumpyModelSampling:
    """Base: sigma <-> timestep and native output <-> x0 (see ``core.models.model_sampling.ModelSampling``)."""

    prediction = "eps"
    sigma_min: float
    sigma_max: float
    sigmas: np.ndarray | None = None

    def timestep(self, sigma: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sigma(self, timestep: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def calculate_input(self, sigma: np.ndarray, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def calculate_denoised(self, sigma: np.ndarray, out: np.ndarray, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def noise_scaling(self, sigma: Any, noise: np.ndarray, latent: np.ndarray, max_denoise: bool = False
                      ) -> np.ndarray:
        raise NotImplementedError

    def alpha_sigma(self, sigma: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(a, s)`` with ``x = a x0 + s n`` in sampler space (``samplers.alpha_sigma``)."""
        s = np.asarray(sigma, dtype=F32)
        return np.ones_like(s), s


def _make_betas(schedule: str, timesteps: int, linear_start: float, linear_end: float) -> np.ndarray:
    """DDPM betas (Ho et al. 2020 sec. 4; scaled_linear: Stable Diffusion; cosine: Nichol & Dhariwal 2021 eq. 17)."""
    if schedule == "linear":
        return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=np.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        t = np.arange(timesteps + 1, dtype=np.float64) / timesteps
        f = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        ac = f / f[0]
        return np.minimum(1 - ac[1:] / ac[:-1], 0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}")


class DiscreteVP(NumpyModelSampling):
    """Discrete VP (DDPM / SD) in k-diffusion form: ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (Karras et al. 2022,
    Table 1); timestep(sigma) interpolates linearly in log-sigma like ``core.models.DiscreteVP``."""

    def __init__(self, prediction: str = "eps", beta_schedule: str = "scaled_linear", linear_start: float = 0.00085,
                 linear_end: float = 0.012, timesteps: int = 1000, zero_terminal_snr: bool = False) -> None:
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"DiscreteVP prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        self.prediction = prediction
        self.num_timesteps = int(timesteps)
        ac = np.cumprod(1.0 - _make_betas(beta_schedule, self.num_timesteps, linear_start, linear_end))
        if zero_terminal_snr:  # Lin et al. 2024, Alg. 1
            sq = np.sqrt(ac)
            a0, aT = sq[0], sq[-1]
            sq = (sq - aT) * a0 / (a0 - aT)
            ac = np.maximum(sq**2, 4.8973451890853435e-08)
        self.sigmas = np.sqrt((1 - ac) / ac).astype(F32)
        self.log_sigmas = np.log(self.sigmas)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def timestep(self, sigma: np.ndarray) -> np.ndarray:
        sigma = np.asarray(sigma, dtype=F32)
        log_sigma = np.log(np.maximum(sigma, F32(1e-10)))
        dists = log_sigma.reshape(-1) - self.log_sigmas[:, None]
        low_idx = np.minimum(np.cumsum(dists >= 0, axis=0).argmax(axis=0), len(self.log_sigmas) - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = np.clip((low - log_sigma.reshape(-1)) / (low - high), 0, 1).astype(F32)
        t = (1 - w) * low_idx.astype(F32) + w * high_idx.astype(F32)
        return t.reshape(sigma.shape)

    def sigma(self, timestep: np.ndarray) -> np.ndarray:
        t = np.clip(np.asarray(timestep, dtype=F32), 0, self.num_timesteps - 1)
        low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
        w = t - np.floor(t)
        return np.exp((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).astype(F32)

    def calculate_input(self, sigma, x):
        s = _bcast(sigma, x)
        return x / (s**2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma, out, x):
        s = _bcast(sigma, x)
        if self.prediction == "eps":
            return x - out * s
        if self.prediction == "v":  # Salimans & Ho 2022, eq. 11 in sigma space
            return x / (s**2 + 1.0) - out * s / (s**2 + 1.0) ** 0.5
        return out

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        s = _bcast(sigma, noise)
        if max_denoise:
            return latent + noise * (s**2 + 1.0) ** 0.5
        return latent + noise * s


class FlowMatching(NumpyModelSampling):
    """Rectified flow / flow matching, ``x = (1 - s) x0 + s n``, velocity prediction (Liu et al. 2022; SD3 shift,
    Esser et al. 2024 eq. 23, lives in the schedules as in ``core.models.FlowMatching``)."""

    prediction = "flow"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000) -> None:
        self.shift, self.multiplier, self.num_timesteps = float(shift), float(multiplier), int(timesteps)
        ts = np.arange(1, timesteps + 1, dtype=F32) / F32(timesteps)
        self.sigmas = flow_time_shift(ts, self.shift)
        self.sigma_min, self.sigma_max = float(self.sigmas[0]), float(self.sigmas[-1])

    def timestep(self, sigma):
        return np.asarray(sigma, dtype=F32) * F32(self.multiplier)

    def sigma(self, timestep):
        return np.asarray(timestep, dtype=F32) / F32(self.multiplier)

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, out, x):
        return x - out * _bcast(sigma, x)

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        s = _bcast(sigma, noise)
        return s * noise + (1.0 - s) * latent

    def alpha_sigma(self, sigma):
        s = np.asarray(sigma, dtype=F32)
        return 1.0 - s, s


class EDM(NumpyModelSampling):
    """EDM preconditioning with an x0 network (Karras et al. 2022, Table 1): ``c_in = 1/sqrt(s^2 + s_data^2)``,
    ``c_noise = ln(s)/4``."""

    prediction = "x0"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 1.0) -> None:
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def timestep(self, sigma):
        return np.log(np.asarray(sigma, dtype=F32)) / 4

    def sigma(self, timestep):
        return np.exp(np.asarray(timestep, dtype=F32) * 4)

    def calculate_input(self, sigma, x):
        return x / (_bcast(sigma, x) ** 2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma, out, x):
        return out

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        return latent + noise * _bcast(sigma, noise)


def model_sampling_from_config(cfg: dict[str, Any]) -> NumpyModelSampling:
    """Rebuild a numpy model sampling from ``ModelSampling.config()`` (the export metadata)."""
    kind = cfg.get("type")
    if kind == "discrete_vp":
        return DiscreteVP(cfg.get("prediction", "eps"), cfg.get("beta_schedule", "scaled_linear"),
                          cfg.get("linear_start", 0.00085), cfg.get("linear_end", 0.012), cfg.get("timesteps", 1000),
                          cfg.get("zero_terminal_snr", False))
    if kind == "flow":
        return FlowMatching(cfg.get("shift", 1.0), cfg.get("multiplier", 1000.0))
    if kind == "edm":
        return EDM(cfg["sigma_min"], cfg["sigma_max"], cfg.get("sigma_data", 1.0))
    raise ValueError(f"unknown model sampling type {kind!r}; expected 'discrete_vp', 'flow' or 'edm'")


# ----------------------------------------------------------------------------------------------- schedules
def flow_time_shift(t: Any, shift: float) -> np.ndarray:
    """SD3's time shift ``shift t / (1 + (shift - 1) t)`` (Esser et al. 2024, eq. 23)."""
    t = np.asarray(t, dtype=F32)
    if shift == 1.0:
        return t
    return (shift * t / (1 + (shift - 1) * t)).astype(F32)


def _append_zero(s: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=F32), np.zeros(1, F32)])


def _check_steps(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5."""
    _check_steps(n)
    ramp = np.linspace(0, 1, n, dtype=np.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Uniform in log-sigma."""
    _check_steps(n)
    return _append_zero(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=np.float64)))


def simple(ms: NumpyModelSampling, n: int) -> np.ndarray:
    """ComfyUI's "simple": every ``len(sigmas)/n``-th training sigma from the top."""
    _check_steps(n)
    sigmas = ms.sigmas
    if sigmas is None:
        ts = np.linspace(float(ms.timestep(F32(ms.sigma_min))), float(ms.timestep(F32(ms.sigma_max))), 1000,
                         dtype=F32)
        sigmas = ms.sigma(ts)
    ss = len(sigmas) / n
    return _append_zero(np.array([sigmas[-(1 + int(i * ss))] for i in range(n)], F32))


def uniform(ms: NumpyModelSampling, n: int, sgm: bool = False) -> np.ndarray:
    """Uniform in timestep ("normal"); ``sgm=True`` drops the last point ("sgm_uniform")."""
    _check_steps(n)
    if isinstance(ms, FlowMatching):
        t_min = float(ms.sigmas[0]) if not sgm else 0.0
        ts = np.linspace(1.0, t_min, n + 1, dtype=F32)[:-1] if sgm else np.linspace(1.0, t_min, n, dtype=F32)
        return _append_zero(flow_time_shift(ts, ms.shift))
    start, end = float(ms.timestep(F32(ms.sigma_max))), float(ms.timestep(F32(ms.sigma_min)))
    ts = np.linspace(start, end, n + 1, dtype=F32)[:-1] if sgm else np.linspace(start, end, n, dtype=F32)
    return _append_zero(np.array([ms.sigma(t) for t in ts], F32))


def flow_shift(n: int, shift: float = 3.0) -> np.ndarray:
    """Rectified-flow schedule: uniform ``t`` through the SD3 shift."""
    _check_steps(n)
    return flow_time_shift(np.linspace(1.0, 0.0, n + 1, dtype=F32), shift)


def timestep_list(ms: NumpyModelSampling, timesteps: Sequence[float]) -> np.ndarray:
    """Sigmas at explicit model timesteps, e.g. DMD2's ``[999, 749, 499, 249]`` (Yin et al. 2024, sec. 4.3)."""
    ts = np.asarray(list(timesteps), dtype=F32)
    if ts.ndim != 1 or len(ts) == 0 or (ts[1:] >= ts[:-1]).any():
        raise ValueError(f"timesteps must be a non-empty strictly decreasing list, got {ts.tolist()}")
    return _append_zero(np.array([ms.sigma(t) for t in ts], F32))


def get_sigmas(name: str, ms: NumpyModelSampling, steps: int, **kwargs: Any) -> np.ndarray:
    """Sigmas by schedule name, as ``core.sampling.get_sigmas``."""
    if name == "simple":
        return simple(ms, steps)
    if name in ("uniform", "normal"):
        return uniform(ms, steps)
    if name == "sgm_uniform":
        return uniform(ms, steps, sgm=True)
    if name == "karras":
        return karras(steps, ms.sigma_min, ms.sigma_max, kwargs.get("rho", 7.0))
    if name == "exponential":
        return exponential(steps, ms.sigma_min, ms.sigma_max)
    if name == "flow_shift":
        return flow_shift(steps, kwargs.get("shift", getattr(ms, "shift", 3.0)))
    raise ValueError(f"unknown schedule {name!r}; the ONNX runtime has simple, uniform, normal, sgm_uniform, karras, "
                     "exponential, flow_shift")


def check_sigmas(sigmas: Any) -> np.ndarray:
    s = np.asarray(sigmas, dtype=F32)
    if s.ndim != 1 or s.size < 2 or not np.isfinite(s).all() or (s < 0).any() or (s[1:] >= s[:-1]).any():
        raise ValueError(f"sigmas must be 1-D, finite, non-negative, strictly decreasing with >= 2 entries, got "
                         f"{np.round(s, 4).tolist()}")
    return s


# ------------------------------------------------------------------------------------------------ samplers
def default_noise_sampler(x: np.ndarray, seed: int | None = None) -> NoiseSampler:
    """Fresh standard normal noise per call from numpy's PCG64 (not torch's stream: pass a ``noise_sampler`` to
    reproduce a torch run)."""
    rng = np.random.default_rng(seed)
    return lambda sigma, sigma_next: rng.standard_normal(x.shape, dtype=F32)


def _prepare(x: np.ndarray, sigmas: Any, extra_args: dict | None):
    if not isinstance(x, np.ndarray) or x.ndim < 2:
        raise ValueError(f"x must be a batched numpy array (B, ...), got {type(x).__name__}")
    return check_sigmas(sigmas), dict(extra_args or {}), np.ones(x.shape[0], F32)


def _cb(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _to_d(x, sigma, denoised):
    """``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 4); the velocity for flow models."""
    return (x - denoised) / sigma


def sample_euler(model, x, sigmas, extra_args=None, callback=None) -> np.ndarray:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the correction)."""
    sigmas, extra_args, s_in = _prepare(x, sigmas, extra_args)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, i, x, sigmas[i], denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2), general ``(alpha, sigma)`` form."""
    sigmas, extra_args, s_in = _prepare(x, sigmas, extra_args)
    ms = model.model_sampling
    old_denoised, h_last = None, None
    with np.errstate(divide="ignore", invalid="ignore"):  # flow models start at alpha = 0: lambda = -inf
        for i in range(len(sigmas) - 1):
            denoised = model(x, sigmas[i] * s_in, **extra_args)
            _cb(callback, i, x, sigmas[i], denoised)
            if sigmas[i + 1] == 0:
                x = denoised
                continue
            a, s = ms.alpha_sigma(sigmas[i])
            a_n, s_n = ms.alpha_sigma(sigmas[i + 1])
            h = (np.log(a_n) - np.log(s_n)) - (np.log(a) - np.log(s))
            if old_denoised is None:
                x = (s_n / s) * x - a_n * np.expm1(-h) * denoised
            else:
                r = h_last / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                x = (s_n / s) * x - a_n * np.expm1(-h) * denoised_d
            old_denoised, h_last = denoised, h
    return x


def _x0_renoise(model, x, sigmas, extra_args, callback, noise_sampler) -> np.ndarray:
    sigmas, extra_args, s_in = _prepare(x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra_args.get("seed"))
    extra_args.pop("seed", None)
    ms = model.model_sampling
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _cb(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = ms.noise_scaling(sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]), x)
    return x


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None) -> np.ndarray:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM, Luo et al. 2023, Alg. 3): x0, re-noise."""
    return _x0_renoise(model, x, sigmas, extra_args, callback, noise_sampler)


def sample_dmd(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None) -> np.ndarray:
    """DMD2 multistep generation (Yin et al. 2024, sec. 4.3): x0 at each training timestep, forward-diffused."""
    return _x0_renoise(model, x, sigmas, extra_args, callback, noise_sampler)


def sample_flow_map(model, x, sigmas, extra_args=None, callback=None, target_key: str | None = "sigma_next"
                    ) -> np.ndarray:
    """Flow-map any-step sampling ``x_s = x_t + (s - t) u(x_t, t, s)`` (Boffi et al. 2025; Sabour et al. 2025,
    eq. 3). The model gets the target sigma as ``extra_args[target_key]``; ``target_key=None`` is plain Euler."""
    sigmas, extra_args, s_in = _prepare(x, sigmas, extra_args)
    for i in range(len(sigmas) - 1):
        kw = dict(extra_args)
        if target_key:
            kw[target_key] = sigmas[i + 1] * s_in
        denoised = model(x, sigmas[i] * s_in, **kw)
        _cb(callback, i, x, sigmas[i], denoised)
        x = denoised if sigmas[i + 1] == 0 else x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def sample_onestep(model, x, sigmas, extra_args=None, callback=None) -> np.ndarray:
    """One-step generation (InstaFlow, Liu et al. 2024; DMD one-step): one evaluation at ``sigmas[0]``."""
    sigmas, extra_args, s_in = _prepare(x, sigmas, extra_args)
    denoised = model(x, sigmas[0] * s_in, **extra_args)
    _cb(callback, 0, x, sigmas[0], denoised)
    return denoised


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "euler": sample_euler,
    "dpmpp_2m": sample_dpmpp_2m,
    "lcm": sample_lcm,
    "dmd": sample_dmd,
    "flow_map": sample_flow_map,
    "onestep": sample_onestep,
}
STOCHASTIC = ("lcm", "dmd")


def get_sampler(name: str) -> Callable[..., np.ndarray]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"the ONNX runtime has no sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
