"""Re-export of ``core.sampling.model_sampling`` (the model samplings moved there to be shared, over numpy or torch,
by the torch core and the torch-free ONNX runtime); kept so ``core.models.model_sampling`` imports keep working."""

from ..sampling.model_sampling import *  # noqa: F403 - this module is the re-export
from ..sampling.model_sampling import __all__  # noqa: F401
