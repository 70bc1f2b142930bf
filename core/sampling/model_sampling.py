"""Model sampling: the map between sigma, timestep and a model's native parameterisation, over numpy or torch.

Every model is seen by fewstep as a k-diffusion / EDM denoiser ``D(x, sigma) -> x0_hat``
(Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
eq. 2 and Table 1). A ``ModelSampling`` object knows, for one family of models:

- the sigma range and ``timestep(sigma)`` / ``sigma(timestep)``;
- ``calculate_input``: how the noisy sample ``x`` is scaled before the network sees it;
- ``calculate_denoised``: how the network's native output (eps, v, x0 or flow velocity) becomes x0;
- ``noise_scaling`` / ``inverse_noise_scaling``: how to put noise at a sigma and undo it.

The conventions match ComfyUI's ``comfy/model_sampling.py`` (EPS, V_PREDICTION, X0, CONST with
ModelSamplingDiscrete / ModelSamplingDiscreteFlow) so a core sampler runs unchanged on ComfyUI
models. In "sigma space" a VP model's sample is ``x = x0 + sigma * noise`` (variance exploding form
of the DDPM forward process, Song et al. 2021 eq. 31) and a flow model's sample is
``x = (1 - sigma) * x0 + sigma * noise`` (rectified flow, Liu et al. 2022 eq. 1): ``alpha_sigma`` and ``is_flow``
say which, for fewstep's and ComfyUI's model samplings alike.

Each formula is written once over an array namespace (``xp``, see ``core.sampling.xp``): ``xp="torch"`` (the
default) is the core's model sampling, ``xp="numpy"`` the ONNX runtime's (``core.export.np_sampling``). Importing
this module does not import torch.
"""

from __future__ import annotations

import math
from typing import Any

from .xp import Array, array_namespace, namespace

__all__ = [
    "BETA_SCHEDULES", "EDM", "DiscreteVP", "FlowMatching", "ModelSampling", "alpha_sigma", "broadcast_sigma",
    "flow_time_shift", "get_model_sampling", "is_flow", "make_betas", "model_sampling_from_config",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


# ------------------------------------------------------------------------------------------ small facts
def is_flow(model_sampling: Any) -> bool:
    """True for rectified-flow / flow-matching model samplings (fewstep's ``FlowMatching`` or ComfyUI's ``CONST``)."""
    if getattr(model_sampling, "prediction", None) == "flow":
        return True
    return any(c.__name__ == "CONST" for c in type(model_sampling).__mro__)


def alpha_sigma(model_sampling: Any, sigma: Array) -> tuple[Array, Array]:
    """Signal and noise coefficients ``(a, s)`` with ``x = a x0 + s n`` in sampler space: ``(1 - sigma, sigma)``
    for flow models, ``(1, sigma)`` for VP/EDM models (same type and shape as ``sigma``)."""
    if is_flow(model_sampling):
        return 1.0 - sigma, sigma
    return 0.0 * sigma + 1.0, sigma


def get_model_sampling(model: Any) -> Any:
    """Find the model sampling object of a fewstep ``Denoiser``, an ONNX runtime ``OnnxDenoiser`` or a ComfyUI
    ``KSampler`` model (``model.inner_model.inner_model.model_sampling``)."""
    probe = model
    for _ in range(4):
        ms = getattr(probe, "model_sampling", None)
        if ms is not None:
            return ms
        probe = getattr(probe, "inner_model", None)
        if probe is None:
            break
    raise AttributeError(
        f"{type(model).__name__} has no model_sampling; wrap it with fewstep.core.models.Denoiser(model, "
        "model_sampling) or pass a ComfyUI model"
    )


def broadcast_sigma(sigma: Array, like: Array) -> Array:
    """Reshape a per-sample sigma ``(B,)`` or scalar so it broadcasts against ``like`` ``(B, ...)``."""
    sigma = array_namespace(like).asarray(sigma, dtype=like.dtype, like=like)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def flow_time_shift(t: Array | float, shift: float, xp: str | None = None) -> Array:
    """Resolution-dependent timestep shift of SD3 (Esser et al. 2024, eq. 23):
    ``sigma = shift * t / (1 + (shift - 1) * t)``."""
    ns = namespace(xp) if xp else array_namespace(t)
    t = ns.asarray(t, dtype=ns.float32)
    if shift == 1.0:
        return t
    return ns.astype(shift * t / (1 + (shift - 1) * t), ns.float32)


def make_betas(schedule: str, timesteps: int, linear_start: float, linear_end: float, xp: str = "torch") -> Array:
    """DDPM beta schedules in float64 (Ho et al. 2020 sec. 4; "scaled_linear" is Stable Diffusion's, cosine is
    Nichol & Dhariwal 2021 eq. 17)."""
    ns = namespace(xp)
    if schedule == "linear":
        return ns.linspace(linear_start, linear_end, timesteps, dtype=ns.float64)
    if schedule == "scaled_linear":
        return ns.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=ns.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        t = ns.arange(timesteps + 1, dtype=ns.float64) / timesteps
        f = ns.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return ns.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], None, 0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


# ------------------------------------------------------------------------------------------ model samplings
class ModelSampling:
    """Base class: sigma <-> timestep and native output <-> x0 for one model family, over ``self.xp``."""

    prediction: str = "eps"
    sigma_min: float
    sigma_max: float
    sigmas: Array | None = None
    xp_name: str = "torch"

    @property
    def xp(self) -> Any:
        """The array namespace this model sampling computes in (``core.sampling.xp``)."""
        return namespace(self.xp_name)

    # -- sigma / timestep -------------------------------------------------
    def timestep(self, sigma: Array) -> Array:
        raise NotImplementedError

    def sigma(self, timestep: Array) -> Array:
        raise NotImplementedError

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the sampling run (0 = start, 1 = end), as ComfyUI's nodes use it."""
        raise NotImplementedError

    # -- native parameterisation -----------------------------------------
    def calculate_input(self, sigma: Array, x: Array) -> Array:
        raise NotImplementedError

    def calculate_denoised(self, sigma: Array, model_output: Array, x: Array) -> Array:
        raise NotImplementedError

    def output_from_denoised(self, sigma: Array, denoised: Array, x: Array) -> Array:
        """Inverse of ``calculate_denoised``: the native output a model must produce to give x0."""
        raise NotImplementedError

    def noise_scaling(self, sigma: Array, noise: Array, latent: Array, max_denoise: bool = False) -> Array:
        raise NotImplementedError

    def inverse_noise_scaling(self, sigma: Array, latent: Array) -> Array:
        return latent

    def config(self) -> dict:
        """A JSON-able description (used for export metadata and calibration hashes)."""
        raise NotImplementedError


class DiscreteVP(ModelSampling):
    """Discrete variance-preserving diffusion (DDPM / Stable Diffusion), k-diffusion form.

    ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`` (Karras et al. 2022, Table 1 "VP"); the network
    sees ``x / sqrt(1 + sigma^2)`` and predicts eps, v (Salimans & Ho 2022 eq. 11) or x0.
    ``timestep(sigma)`` interpolates linearly in log-sigma between the discrete steps (as
    k-diffusion's ``DiscreteSchedule(quantize=False)``); ``quantize=True`` rounds to the nearest step
    as ComfyUI does.
    """

    def __init__(
        self,
        prediction: str = "eps",
        beta_schedule: str = "scaled_linear",
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
        timesteps: int = 1000,
        quantize: bool = False,
        zero_terminal_snr: bool = False,
        xp: str = "torch",
    ) -> None:
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"DiscreteVP prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        self.xp_name = namespace(xp).name
        self.prediction = prediction
        self.beta_schedule = beta_schedule
        self.linear_start, self.linear_end = float(linear_start), float(linear_end)
        self.num_timesteps = int(timesteps)
        self.quantize = quantize
        self.zero_terminal_snr = zero_terminal_snr
        ns = self.xp
        betas = make_betas(beta_schedule, self.num_timesteps, linear_start, linear_end, xp=xp)
        alphas_cumprod = ns.cumprod(1.0 - betas, 0)
        if zero_terminal_snr:  # Lin et al. 2024, "Common Diffusion Noise Schedules ... are Flawed", Alg. 1
            sqrt_ac = ns.sqrt(alphas_cumprod)
            a0, aT = float(sqrt_ac[0]), float(sqrt_ac[-1])
            sqrt_ac = (sqrt_ac - aT) * a0 / (a0 - aT)
            alphas_cumprod = ns.clip(sqrt_ac**2, 4.8973451890853435e-08, None)  # ComfyUI's clamp
        self.alphas_cumprod = ns.astype(alphas_cumprod, ns.float32)
        self.sigmas = ns.astype(ns.sqrt((1 - alphas_cumprod) / alphas_cumprod), ns.float32)
        self.log_sigmas = ns.log(self.sigmas)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: Array) -> Array:
        ns = self.xp
        sigma = ns.asarray(sigma)
        log_sigmas = ns.asarray(self.log_sigmas, like=sigma)
        log_sigma = ns.log(ns.clip(ns.astype(sigma, ns.float32), 1e-10, None)).reshape(-1)
        dists = log_sigma - log_sigmas[:, None]
        if self.quantize:
            return ns.astype(ns.argmin(ns.abs(dists), 0), ns.float32).reshape(sigma.shape)
        low_idx = ns.clip(ns.argmax(ns.cumsum(dists >= 0, 0), 0), None, log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ns.clip((low - log_sigma) / (low - high), 0, 1)
        t = (1 - w) * ns.astype(low_idx, ns.float32) + w * ns.astype(high_idx, ns.float32)
        return t.reshape(sigma.shape)

    def sigma(self, timestep: Array) -> Array:
        ns = self.xp
        t = ns.clip(ns.asarray(timestep, dtype=ns.float32), 0, self.num_timesteps - 1)
        log_sigmas = ns.asarray(self.log_sigmas, like=t)
        low, high = ns.floor(t), ns.ceil(t)
        w = t - low
        return ns.exp((1 - w) * log_sigmas[ns.astype(low, ns.int64)] + w * log_sigmas[ns.astype(high, ns.int64)])

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(self.xp.asarray((1.0 - percent) * (self.num_timesteps - 1))))

    def calculate_input(self, sigma: Array, x: Array) -> Array:
        s = broadcast_sigma(sigma, x)
        return x / (s**2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: Array, model_output: Array, x: Array) -> Array:
        s = broadcast_sigma(sigma, x)
        if self.prediction == "eps":
            return x - model_output * s
        if self.prediction == "v":
            return x / (s**2 + 1.0) - model_output * s / (s**2 + 1.0) ** 0.5
        return model_output

    def output_from_denoised(self, sigma: Array, denoised: Array, x: Array) -> Array:
        s = broadcast_sigma(sigma, x)
        if self.prediction == "eps":
            return (x - denoised) / s
        if self.prediction == "v":
            return (x / (s**2 + 1.0) - denoised) * (s**2 + 1.0) ** 0.5 / s
        return denoised

    def noise_scaling(self, sigma: Array, noise: Array, latent: Array, max_denoise: bool = False) -> Array:
        s = broadcast_sigma(sigma, noise)
        if max_denoise:
            return latent + noise * (s**2 + 1.0) ** 0.5
        return latent + noise * s

    def config(self) -> dict:
        return {
            "type": "discrete_vp",
            "prediction": self.prediction,
            "beta_schedule": self.beta_schedule,
            "linear_start": self.linear_start,
            "linear_end": self.linear_end,
            "timesteps": self.num_timesteps,
            "zero_terminal_snr": self.zero_terminal_snr,
        }


class FlowMatching(ModelSampling):
    """Continuous flow matching / rectified flow with velocity prediction (Lipman et al. 2023,
    Liu et al. 2022; SD3/Flux convention ``x_t = (1 - t) x0 + t noise``, ``v = noise - x0``).

    ``sigma = shift(t)`` for training time ``t`` in (0, 1]; the network sees ``timestep = sigma * multiplier``
    (1000 for SD3-style models, 1 for Flux) and ``sigma(timestep)`` is its exact inverse. (ComfyUI's
    ``ModelSamplingDiscreteFlow.sigma`` applies the shift again; fewstep keeps the two maps inverse and applies
    the shift in the schedules instead, giving the same sigmas.)
    """

    prediction = "flow"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000,
                 xp: str = "torch") -> None:
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.xp_name = namespace(xp).name
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.num_timesteps = int(timesteps)
        ns = self.xp
        ts = ns.arange(1, timesteps + 1, dtype=ns.float32) / timesteps
        self.sigmas = flow_time_shift(ts, self.shift)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: Array) -> Array:
        return self.xp.asarray(sigma) * self.multiplier

    def sigma(self, timestep: Array) -> Array:
        return self.xp.asarray(timestep, dtype=self.xp.float32) / self.multiplier

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(flow_time_shift(1.0 - percent, self.shift, xp=self.xp_name))

    def calculate_input(self, sigma: Array, x: Array) -> Array:
        return x

    def calculate_denoised(self, sigma: Array, model_output: Array, x: Array) -> Array:
        return x - model_output * broadcast_sigma(sigma, x)

    def output_from_denoised(self, sigma: Array, denoised: Array, x: Array) -> Array:
        return (x - denoised) / broadcast_sigma(sigma, x)

    def noise_scaling(self, sigma: Array, noise: Array, latent: Array, max_denoise: bool = False) -> Array:
        s = broadcast_sigma(sigma, noise)
        return s * noise + (1.0 - s) * latent

    def inverse_noise_scaling(self, sigma: Array, latent: Array) -> Array:
        return latent / (1.0 - broadcast_sigma(sigma, latent))

    def config(self) -> dict:
        return {"type": "flow", "prediction": "flow", "shift": self.shift, "multiplier": self.multiplier}


class EDM(ModelSampling):
    """Continuous EDM preconditioning with an x0 target (Karras et al. 2022, Table 1 "ours"):
    ``c_in = 1/sqrt(sigma^2 + sigma_data^2)``, the network sees ``c_in * x`` and ``c_noise = ln(sigma)/4``.
    Used by the analytic ground-truth denoisers, whose output already is x0."""

    prediction = "x0"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 1.0,
                 xp: str = "torch") -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.xp_name = namespace(xp).name
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def timestep(self, sigma: Array) -> Array:
        return self.xp.log(self.xp.asarray(sigma)) / 4

    def sigma(self, timestep: Array) -> Array:
        return self.xp.exp(self.xp.asarray(timestep) * 4)

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp(hi + (lo - hi) * percent)

    def calculate_input(self, sigma: Array, x: Array) -> Array:
        return x / (broadcast_sigma(sigma, x) ** 2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: Array, model_output: Array, x: Array) -> Array:
        return model_output

    def output_from_denoised(self, sigma: Array, denoised: Array, x: Array) -> Array:
        return denoised

    def noise_scaling(self, sigma: Array, noise: Array, latent: Array, max_denoise: bool = False) -> Array:
        return latent + noise * broadcast_sigma(sigma, noise)

    def config(self) -> dict:
        return {"type": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}


def model_sampling_from_config(cfg: dict, xp: str = "torch") -> ModelSampling:
    """Rebuild a ``ModelSampling`` from ``ModelSampling.config()`` (export metadata, weight configs)."""
    kind = cfg.get("type")
    if kind == "discrete_vp":
        return DiscreteVP(
            prediction=cfg.get("prediction", "eps"),
            beta_schedule=cfg.get("beta_schedule", "scaled_linear"),
            linear_start=cfg.get("linear_start", 0.00085),
            linear_end=cfg.get("linear_end", 0.012),
            timesteps=cfg.get("timesteps", 1000),
            zero_terminal_snr=cfg.get("zero_terminal_snr", False),
            xp=xp,
        )
    if kind == "flow":
        return FlowMatching(shift=cfg.get("shift", 1.0), multiplier=cfg.get("multiplier", 1000.0), xp=xp)
    if kind == "edm":
        return EDM(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"], sigma_data=cfg.get("sigma_data", 1.0),
                   xp=xp)
    raise ValueError(f"unknown model sampling type {kind!r}; expected 'discrete_vp', 'flow' or 'edm'")
