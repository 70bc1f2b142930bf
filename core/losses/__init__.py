"""Distillation losses as plain functions (pure torch): DMD2 (+ GAN, f-divergence), consistency (LCM, multistep,
pseudo-Huber), reflow (InstaFlow, U-shaped time) and guidance distillation (AGD)."""

from .common import (
    ddim_transfer,
    flow_time,
    fraction_at_sigma,
    is_flow_sampling,
    sigma_at_fraction,
    sigma_from_flow_time,
    signal_noise,
)
from .consistency import (
    consistency_distance,
    consistency_grid,
    consistency_loss,
    pseudo_huber,
    pseudo_huber_c,
    segment_boundaries,
    segment_end_index,
)
from .dmd import (
    DIVERGENCES,
    dmd_gradient,
    dmd_loss,
    f_divergence_weight,
    f_divergence_weights,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from .guidance import guidance_distillation_loss, guidance_target
from .reflow import (
    reflow_huber_loss,
    reflow_loss,
    straight_path,
    top_density,
    top_time,
    u_shaped_density,
    u_shaped_time,
)

__all__ = [
    "DIVERGENCES", "consistency_distance", "consistency_grid", "consistency_loss", "ddim_transfer", "dmd_gradient",
    "dmd_loss",
    "f_divergence_weight", "f_divergence_weights", "fake_score_loss", "flow_time", "fraction_at_sigma",
    "gan_discriminator_loss", "gan_generator_loss", "guidance_distillation_loss", "guidance_target",
    "is_flow_sampling", "pseudo_huber", "pseudo_huber_c", "reflow_huber_loss", "reflow_loss", "segment_boundaries",
    "segment_end_index", "sigma_at_fraction", "sigma_from_flow_time", "signal_noise", "straight_path", "top_density",
    "top_time", "u_shaped_density", "u_shaped_time",
]
