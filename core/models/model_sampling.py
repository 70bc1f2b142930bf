"""Re-export of ``core.sampling.model_sampling`` (the model samplings moved there to be shared, over numpy or torch,
by the torch core and the torch-free ONNX runtime); kept so ``core.models.model_sampling`` imports keep working."""

from ..sampling.model_sampling import (
    EDM,
    DiscreteVP,
    FlowMatching,
    ModelSampling,
    alpha_sigma,
    broadcast_sigma,
    flow_time_shift,
    get_model_sampling,
    is_flow,
    make_betas,
    model_sampling_from_config,
)

__all__ = [
    "EDM", "DiscreteVP", "FlowMatching", "ModelSampling", "alpha_sigma", "broadcast_sigma", "flow_time_shift",
    "get_model_sampling", "is_flow", "make_betas", "model_sampling_from_config",
]
