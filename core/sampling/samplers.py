"""Samplers: plain functions over (denoiser, x, sigmas) with ComfyUI's KSAMPLER signature.

``sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x0``

``model(x, sigma * s_in, **extra_args)`` returns x0 (the denoiser convention of ``core.models``);
``x`` starts at ``sigmas[0]`` in the model's sigma space (``x = a x0 + s n`` with ``a = 1`` for
VP/EDM models, ``a = 1 - s`` for flow models). Multistep and exponential-integrator updates are
written with general ``(alpha, sigma)`` so they are exact for both; for ``alpha = 1`` they are
literally k-diffusion's / ComfyUI's formulas.

Every sampler is written once over an array namespace (``core.sampling.xp``): given torch tensors it runs under
``torch.no_grad`` as the core and ComfyUI's KSAMPLER use it; given numpy arrays (and a model on numpy arrays, such
as ``core.export.runtime.OnnxDenoiser``) it is the torch-free ONNX runtime's sampler. Names, flags and NFE live in
``registry.py``. Importing this module does not import torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from .model_sampling import alpha_sigma, get_model_sampling, is_flow
from .registry import NFE as NFE  # re-exported: the registry holds it
from .registry import REGISTRY
from .schedules import check_sigmas
from .xp import Array, NoiseSampler, array_namespace


# --------------------------------------------------------------------------------------- helpers
def default_noise_sampler(x: Array, seed: int | None = None) -> NoiseSampler:
    """Fresh Gaussian noise per call, seeded like current ComfyUI's ``default_noise_sampler`` (since 0.6.0).

    Convention (torch): a generator on ``x.device`` seeded with ``seed``, or ``seed + 1`` on the CPU (so the first
    ancestral noise differs from the initial latent noise drawn with ``seed``); ``seed=None`` uses torch's global
    generator. Inside ComfyUI fewstep's sampler nodes pass the host's own noise sampler instead, so a seed gives the
    host's sample on every ComfyUI version (``nodes/samplers.py``); pass ``noise_sampler`` to any ancestral sampler
    here to use another stream. numpy arrays get numpy's PCG64 stream.
    """
    return array_namespace(x).noise_sampler(x, seed)


def _sampler(fn: Callable[..., Array]) -> Callable[..., Array]:
    """Run a sampler in the namespace of ``x``: under ``torch.no_grad`` for tensors, with numpy's log(0)
    warnings silenced for arrays (a flow model at sigma = 1 has alpha = 0)."""

    @functools.wraps(fn)
    def run(model: Any, x: Array, sigmas: Array, *args: Any, **kwargs: Any) -> Array:
        ns = array_namespace(x)
        with ns.no_grad(), ns.errstate():
            return fn(model, x, sigmas, *args, **kwargs)

    return run


def _is_discrete_vp(model_sampling: Any) -> bool:
    """Discrete-timestep VP sampling (fewstep's ``DiscreteVP`` or ComfyUI's ``ModelSamplingDiscrete``)."""
    return (not is_flow(model_sampling) and getattr(model_sampling, "sigmas", None) is not None
            and (hasattr(model_sampling, "num_timesteps") or hasattr(model_sampling, "log_sigmas")))


def _lambda(xp: Any, alpha: Array, sigma: Array) -> Array:
    """Half log-SNR ``lambda = log(alpha / sigma)`` (Lu et al. 2022, DPM-Solver, sec. 3.1)."""
    return xp.log(alpha) - xp.log(sigma)


def _prepare(model: Any, x: Array, sigmas: Any, extra_args: dict | None) -> tuple[Any, Array, dict, Array]:
    try:
        xp = array_namespace(x)
    except TypeError:
        xp = None
    if xp is None or getattr(x, "ndim", 0) < 2:
        raise ValueError(f"x must be a batched tensor or array (B, ...), got {type(x).__name__} "
                         f"{getattr(x, 'shape', '')}")
    sigmas = xp.asarray(check_sigmas(sigmas, xp=xp.name), like=x)
    extra_args = {} if extra_args is None else extra_args
    return xp, sigmas, extra_args, xp.ones(x.shape[0], like=x)


def _steps(n: int, disable: bool | None) -> Iterable[int]:
    """``range(n)`` with tqdm's progress bar unless ``disable`` (tqdm's rule: ``None`` shows it on a terminal)."""
    if disable is True:
        return range(n)
    try:
        from tqdm.auto import trange
    except ImportError:  # the torch-free runtime does not need tqdm
        return range(n)
    return trange(n, disable=disable)


def _callback(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def _to_d(x: Array, sigma: Array, denoised: Array) -> Array:
    """Karras ODE derivative ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al. 2022, eq. 4 for VE);
    for flow models it equals the velocity ``n - x0``."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: Array, sigma_to: Array, eta: float = 1.0) -> tuple[Array, Array]:
    """Split a step into a deterministic part to ``sigma_down`` plus fresh noise ``sigma_up`` (k-diffusion)."""
    if not eta:
        return sigma_to, 0.0 * sigma_to
    xp = array_namespace(sigma_to)
    sigma_up = xp.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


# ------------------------------------------------------------------------------ teacher samplers
@_sampler
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Array:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the 2nd-order correction)."""
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    for i in _steps(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, i, x, sigmas[i], denoised)
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@_sampler
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Array:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); the last step to sigma=0 is Euler."""
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    for i in _steps(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, i, x, sigmas[i], denoised)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            x = x + (d + _to_d(x_2, sigmas[i + 1], denoised_2)) / 2 * dt
    return x


@_sampler
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None) -> Array:
    """Ancestral Euler (k-diffusion): Euler to ``sigma_down`` then fresh noise ``sigma_up``.
    For flow models the split keeps ``x = a x0 + s n`` on the flow path (ComfyUI's RF variant)."""
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra_args.get("seed"))
    flow = is_flow(get_model_sampling(model))
    for i in _steps(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        if not flow:
            sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
            x = x + _to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        else:  # rectified flow: go down to sigma_down, rescale the signal, add noise to land on sigmas[i+1]
            s, sn = sigmas[i], sigmas[i + 1]
            downstep_ratio = 1 + (sn / s - 1) * eta
            sigma_down = sn * downstep_ratio
            alpha_ip1, alpha_down = 1 - sn, 1 - sigma_down
            renoise = xp.clip(sn**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2, 0, None) ** 0.5
            x = x + _to_d(x, s, denoised) * (sigma_down - s)
            x = (alpha_ip1 / alpha_down) * x + noise_sampler(s, sn) * s_noise * renoise
    return x


@_sampler
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Array:
    """DPM-Solver++(2M), multistep data prediction (Lu et al. 2022, arXiv:2211.01095, Alg. 2):
    ``x_t = (s_t/s_s) x_s - a_t (e^{-h} - 1) [(1 + 1/2r) D_s - 1/2r D_prev]``."""
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    ms = get_model_sampling(model)
    old_denoised, h_last = None, None
    for i in _steps(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        a, s = alpha_sigma(ms, sigmas[i])
        a_n, s_n = alpha_sigma(ms, sigmas[i + 1])
        h = _lambda(xp, a_n, s_n) - _lambda(xp, a, s)
        if old_denoised is None:
            x = (s_n / s) * x - a_n * xp.expm1(-h) * denoised
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s_n / s) * x - a_n * xp.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


@_sampler
def sample_unipc(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Array:
    """UniPC-2 with the B(h) = e^h - 1 ("bh2") variant (Zhao et al. 2023, arXiv:2302.04867, Alg. 2 and 3).

    Predictor UniP-2 (equal to DPM-Solver++(2M)), then corrector UniC-2 which reuses the model value at
    the predicted point: no extra evaluation. Data-prediction form; the last step to sigma=0 returns x0.
    """
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    ms = get_model_sampling(model)
    denoised = model(x, sigmas[0] * s_in, **extra_args)
    _callback(callback, 0, x, sigmas[0], denoised)
    prev = None  # (denoised, lambda) of the step before
    n = len(sigmas) - 1
    for i in _steps(n, disable):
        if sigmas[i + 1] == 0:
            return denoised
        a, s = alpha_sigma(ms, sigmas[i])
        a_n, s_n = alpha_sigma(ms, sigmas[i + 1])
        lam, lam_n = _lambda(xp, a, s), _lambda(xp, a_n, s_n)
        h = lam_n - lam
        hh = -h
        h_phi_1 = xp.expm1(hh)  # e^{-h} - 1
        b_h = xp.expm1(hh)  # bh2
        x_lin = (s_n / s) * x - a_n * h_phi_1 * denoised
        d1 = None
        if prev is not None:
            r1 = (prev[1] - lam) / h
            d1 = (prev[0] - denoised) / r1
            x_pred = x_lin - a_n * b_h * 0.5 * d1
        else:
            x_pred = x_lin
        if i == n - 1:  # no corrector on the final step: it would cost an extra evaluation
            return x_pred
        denoised_n = model(x_pred, sigmas[i + 1] * s_in, **extra_args)
        _callback(callback, i + 1, x_pred, sigmas[i + 1], denoised_n)
        d1_t = denoised_n - denoised
        if d1 is None:  # first order corrector
            x = x_lin - a_n * b_h * 0.5 * d1_t
        else:  # solve the 2x2 order conditions for rho_c
            h_phi_k = h_phi_1 / hh - 1
            b1 = h_phi_k / b_h
            h_phi_k2 = h_phi_k / hh - 0.5
            b2 = h_phi_k2 * 2 / b_h
            # R = [[1, 1], [r1, 1]]  ->  rho = R^{-1} b
            det = 1 - r1
            rho0 = (b1 - b2) / det
            rho1 = (b2 - r1 * b1) / det
            x = x_lin - a_n * b_h * (rho0 * d1 + rho1 * d1_t)
        prev = (denoised, lam) if xp.isfinite(lam) else None  # pure noise (flow, a=0) has no slope
        denoised = denoised_n
    return x


# ---------------------------------------------------------------------------- distilled samplers
def _x0_renoise(model, x, sigmas, extra_args, callback, disable, noise_sampler) -> Array:
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra_args.get("seed"))
    ms = get_model_sampling(model)
    for i in _steps(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, i, x, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = ms.noise_scaling(sigmas[i + 1], noise_sampler(sigmas[i], sigmas[i + 1]), x)
    return x


@_sampler
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None) -> Array:
    """Multistep consistency sampling (Song et al. 2023, Consistency Models, Alg. 1; LCM, Luo et al. 2023,
    Alg. 3): jump to x0 with the consistency function, re-noise to the next sigma with fresh noise."""
    return _x0_renoise(model, x, sigmas, extra_args, callback, disable, noise_sampler)


@_sampler
def sample_dmd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None) -> Array:
    """DMD2 multistep generation (Yin et al. 2024, "Improved Distribution Matching Distillation", sec. 4.3):
    the generator predicts x0 at each of its training timesteps (e.g. 999/749/499/249) and the prediction is
    forward-diffused to the next one with fresh noise. Same update as multistep consistency sampling."""
    return _x0_renoise(model, x, sigmas, extra_args, callback, disable, noise_sampler)


@_sampler
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
               gamma: float = 0.3, quantize: bool | None = None) -> Array:
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, eq. 16-17).

    From ``x_t``: predict x0 and eps, move deterministically (DDIM) to ``s = (1 - gamma) * t_next``
    (in model timesteps), then forward-diffuse from ``s`` to ``t_next`` with fresh noise. ``gamma=0`` is
    DDIM, ``gamma=1`` is multistep consistency sampling (for discrete VP models it lands on timestep 0, as
    diffusers' TCDScheduler). ``quantize`` floors ``s`` to an integer timestep as diffusers does (default: on
    for discrete models). Continuous models use ``sigma_s = (1 - gamma) sigma_next``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must be in [0, 1], got {gamma}")
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    noise_sampler = noise_sampler or default_noise_sampler(x, seed=extra_args.get("seed"))
    ms = get_model_sampling(model)
    if quantize is None:
        quantize = _is_discrete_vp(ms)
    for i in _steps(len(sigmas) - 1, disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _callback(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        a, s = alpha_sigma(ms, sigmas[i])
        eps = (x - a * denoised) / s
        if gamma == 0:
            sig_s = sigmas[i + 1]
        elif _is_discrete_vp(ms):  # discrete VP: s = (1 - gamma) t_next in model timesteps
            t_s = ms.timestep(sigmas[i + 1]) * (1 - gamma)
            if quantize:
                t_s = xp.floor(t_s)
            sig_s = xp.minimum(xp.astype(xp.asarray(ms.sigma(t_s), like=x), xp.float32).reshape(()), sigmas[i + 1])
        else:  # flow (timestep = sigma * multiplier) and continuous models: scale sigma directly
            sig_s = (1 - gamma) * sigmas[i + 1]
        a_s, s_s = alpha_sigma(ms, sig_s)
        x = a_s * denoised + s_s * eps
        a_n, s_n = alpha_sigma(ms, sigmas[i + 1])
        renoise = xp.clip(s_n**2 - (a_n * s_s / a_s) ** 2, 0, None) ** 0.5
        x = (a_n / a_s) * x + renoise * noise_sampler(sig_s, sigmas[i + 1])
    return x


@_sampler
def sample_flow_map(model, x, sigmas, extra_args=None, callback=None, disable=None,
                    target_key: str | None = "sigma_next") -> Array:
    """Any-step sampling with a flow map (Boffi et al. 2025, "How to build a consistency model: learning flow
    maps"; Sabour et al. 2025, "Align Your Flow", eq. 3): ``x_s = x_t + (s - t) u(x_t, t, s)``.

    The model receives the target sigma as ``extra_args[target_key]`` and returns the x0 whose Euler step lands
    on ``x_s``; a model that ignores the target (``target_key=None``) makes this plain Euler.
    """
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    for i in _steps(len(sigmas) - 1, disable):
        kw = dict(extra_args)
        if target_key:
            kw[target_key] = sigmas[i + 1] * s_in
        denoised = model(x, sigmas[i] * s_in, **kw)
        _callback(callback, i, x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@_sampler
def sample_onestep(model, x, sigmas, extra_args=None, callback=None, disable=None) -> Array:
    """One-step generation (one-step rectified flow, InstaFlow, Liu et al. 2024; DMD one-step): a single
    evaluation at ``sigmas[0]`` gives the sample. Extra sigmas are ignored by design."""
    xp, sigmas, extra_args, s_in = _prepare(model, x, sigmas, extra_args)
    denoised = model(x, sigmas[0] * s_in, **extra_args)
    _callback(callback, 0, x, sigmas[0], denoised)
    return denoised


@_sampler
def sample_hybrid(model, x, sigmas, extra_args=None, callback=None, disable=None, distilled_model=None,
                  base_steps: int = 1, base_sampler: str = "euler", distilled_sampler: str = "lcm",
                  distilled_extra_args: dict | None = None, **options) -> Array:
    """Hybrid base -> distilled sampling (diversity distillation, Gandikota & Bau 2025, "Distilling Diversity and
    Control in Diffusion Models"): the base model sets the composition in the first ``base_steps`` steps (where
    distilled models lose diversity), the distilled model finishes the remaining steps."""
    if distilled_model is None:
        raise ValueError("sample_hybrid needs distilled_model=<the distilled denoiser>")
    sigmas = check_sigmas(sigmas)
    n = len(sigmas) - 1
    if not 0 <= base_steps <= n:
        raise ValueError(f"base_steps must be in [0, {n}] for {n} steps, got {base_steps}")
    if base_steps > 0:
        x = get_sampler(base_sampler)(model, x, sigmas[: base_steps + 1], extra_args=extra_args,
                                      callback=callback, disable=disable)
    if base_steps < n:
        x = get_sampler(distilled_sampler)(
            distilled_model, x, sigmas[base_steps:],
            extra_args=extra_args if distilled_extra_args is None else distilled_extra_args,
            callback=callback, disable=disable, **options)
    return x


#: name -> function for every sampler of ``registry.REGISTRY`` (its flags and NFE live there)
SAMPLERS: dict[str, Callable[..., Array]] = {name: globals()[spec.function] for name, spec in REGISTRY.items()}


def get_sampler(name: str) -> Callable[..., Array]:
    """A sampler function by name (one of ``SAMPLERS``)."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
