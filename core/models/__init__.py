"""Denoiser convention: model samplings, the Denoiser wrapper, diffusers adapters, analytic and embedded models."""

from .denoiser import Denoiser, get_model_sampling
from .gaussian_mixture import GaussianMixture, GaussianMixtureDenoiser, toy_mixture
from .model_sampling import EDM, DiscreteVP, FlowMatching, ModelSampling, model_sampling_from_config

__all__ = [
    "EDM", "Denoiser", "DiscreteVP", "FlowMatching", "GaussianMixture", "GaussianMixtureDenoiser", "ModelSampling",
    "get_model_sampling", "model_sampling_from_config", "toy_mixture",
]
