"""Model sampling: the map between sigma, timestep and a model's native parameterisation.

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
``x = (1 - sigma) * x0 + sigma * noise`` (rectified flow, Liu et al. 2022 eq. 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PREDICTIONS = ("eps", "v", "x0", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def _bcast(sigma: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample sigma ``(B,)`` or scalar so it broadcasts against ``like`` ``(B, ...)``."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def make_betas(schedule: str, timesteps: int, linear_start: float, linear_end: float) -> Tensor:
    """DDPM beta schedules (Ho et al. 2020 sec. 4; "scaled_linear" is Stable Diffusion's, cosine is
    Nichol & Dhariwal 2021 eq. 17)."""
    if schedule == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {BETA_SCHEDULES}")


class ModelSampling:
    """Base class: sigma <-> timestep and native output <-> x0 for one model family."""

    prediction: str = "eps"
    sigma_min: float
    sigma_max: float

    # -- sigma / timestep -------------------------------------------------
    def timestep(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, timestep: Tensor) -> Tensor:
        raise NotImplementedError

    def percent_to_sigma(self, percent: float) -> float:
        """Sigma at a fraction of the sampling run (0 = start, 1 = end), as ComfyUI's nodes use it."""
        raise NotImplementedError

    # -- native parameterisation -----------------------------------------
    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def output_from_denoised(self, sigma: Tensor, denoised: Tensor, x: Tensor) -> Tensor:
        """Inverse of ``calculate_denoised``: the native output a model must produce to give x0."""
        raise NotImplementedError

    def noise_scaling(self, sigma: Tensor, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        raise NotImplementedError

    def inverse_noise_scaling(self, sigma: Tensor, latent: Tensor) -> Tensor:
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
    ) -> None:
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"DiscreteVP prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        self.prediction = prediction
        self.beta_schedule = beta_schedule
        self.linear_start, self.linear_end = float(linear_start), float(linear_end)
        self.num_timesteps = int(timesteps)
        self.quantize = quantize
        self.zero_terminal_snr = zero_terminal_snr
        betas = make_betas(beta_schedule, timesteps, linear_start, linear_end)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if zero_terminal_snr:  # Lin et al. 2024, "Common Diffusion Noise Schedules ... are Flawed", Alg. 1
            sqrt_ac = alphas_cumprod.sqrt()
            a0, aT = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
            sqrt_ac = (sqrt_ac - aT) * a0 / (a0 - aT)
            alphas_cumprod = (sqrt_ac**2).clamp(min=4.8973451890853435e-08)  # ComfyUI's clamp
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()
        self.log_sigmas = self.sigmas.log()
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().clamp(min=1e-10).log()
        if self.quantize:
            return (log_sigma - log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape).float()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def sigma(self, timestep: Tensor) -> Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, self.num_timesteps - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low_idx = t.floor().long()
        high_idx = t.ceil().long()
        w = t.frac()
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.sigma(torch.tensor((1.0 - percent) * (self.num_timesteps - 1))))

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        s = _bcast(sigma, x)
        return x / (s**2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        s = _bcast(sigma, x)
        if self.prediction == "eps":
            return x - model_output * s
        if self.prediction == "v":
            return x / (s**2 + 1.0) - model_output * s / (s**2 + 1.0) ** 0.5
        return model_output

    def output_from_denoised(self, sigma: Tensor, denoised: Tensor, x: Tensor) -> Tensor:
        s = _bcast(sigma, x)
        if self.prediction == "eps":
            return (x - denoised) / s
        if self.prediction == "v":
            return (x / (s**2 + 1.0) - denoised) * (s**2 + 1.0) ** 0.5 / s
        return denoised

    def noise_scaling(self, sigma: Tensor, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        s = _bcast(sigma, noise)
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


def flow_time_shift(t: Tensor | float, shift: float) -> Tensor:
    """Resolution-dependent timestep shift of SD3 (Esser et al. 2024, eq. 23):
    ``sigma = shift * t / (1 + (shift - 1) * t)``."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


class FlowMatching(ModelSampling):
    """Continuous flow matching / rectified flow with velocity prediction (Lipman et al. 2023,
    Liu et al. 2022; SD3/Flux convention ``x_t = (1 - t) x0 + t noise``, ``v = noise - x0``).

    ``sigma = shift(t)`` for training time ``t`` in (0, 1]; the network sees ``timestep = sigma * multiplier``
    (1000 for SD3-style models, 1 for Flux) and ``sigma(timestep)`` is its exact inverse. (ComfyUI's
    ``ModelSamplingDiscreteFlow.sigma`` applies the shift again; fewstep keeps the two maps inverse and applies
    the shift in the schedules instead, giving the same sigmas.)
    """

    prediction = "flow"

    def __init__(self, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000) -> None:
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.multiplier = float(multiplier)
        self.num_timesteps = int(timesteps)
        ts = torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps
        self.sigmas = flow_time_shift(ts, self.shift)
        self.sigma_min = float(self.sigmas[0])
        self.sigma_max = float(self.sigmas[-1])

    def timestep(self, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma) * self.multiplier

    def sigma(self, timestep: Tensor) -> Tensor:
        return torch.as_tensor(timestep, dtype=torch.float32) / self.multiplier

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(flow_time_shift(torch.tensor(1.0 - percent), self.shift))

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        return x

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        return x - model_output * _bcast(sigma, x)

    def output_from_denoised(self, sigma: Tensor, denoised: Tensor, x: Tensor) -> Tensor:
        return (x - denoised) / _bcast(sigma, x)

    def noise_scaling(self, sigma: Tensor, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        s = _bcast(sigma, noise)
        return s * noise + (1.0 - s) * latent

    def inverse_noise_scaling(self, sigma: Tensor, latent: Tensor) -> Tensor:
        return latent / (1.0 - _bcast(sigma, latent))

    def config(self) -> dict:
        return {"type": "flow", "prediction": "flow", "shift": self.shift, "multiplier": self.multiplier}


def model_sampling_from_config(cfg: dict) -> ModelSampling:
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
        )
    if kind == "flow":
        return FlowMatching(shift=cfg.get("shift", 1.0), multiplier=cfg.get("multiplier", 1000.0))
    if kind == "edm":
        return EDM(sigma_min=cfg["sigma_min"], sigma_max=cfg["sigma_max"], sigma_data=cfg.get("sigma_data", 1.0))
    raise ValueError(f"unknown model sampling type {kind!r}; expected 'discrete_vp', 'flow' or 'edm'")


class EDM(ModelSampling):
    """Continuous EDM preconditioning with an x0 target (Karras et al. 2022, Table 1 "ours"):
    ``c_in = 1/sqrt(sigma^2 + sigma_data^2)``, the network sees ``c_in * x`` and ``c_noise = ln(sigma)/4``.
    Used by the analytic ground-truth denoisers, whose output already is x0."""

    prediction = "x0"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 1.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def timestep(self, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma).log() / 4

    def sigma(self, timestep: Tensor) -> Tensor:
        return (torch.as_tensor(timestep) * 4).exp()

    def percent_to_sigma(self, percent: float) -> float:
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return math.exp(hi + (lo - hi) * percent)

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        return x / (_bcast(sigma, x) ** 2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        return model_output

    def output_from_denoised(self, sigma: Tensor, denoised: Tensor, x: Tensor) -> Tensor:
        return denoised

    def noise_scaling(self, sigma: Tensor, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        return latent + noise * _bcast(sigma, noise)

    def config(self) -> dict:
        return {"type": "edm", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data}
