"""One array namespace for numpy and torch, so model samplings, schedules and samplers are written once.

``array_namespace(x)`` returns the namespace of an array (numpy for ``np.ndarray`` / numpy scalars, torch for
tensors), ``namespace("numpy" | "torch")`` one by name. A namespace forwards every name to its module
(``xp.log``, ``xp.expm1``, ``xp.minimum``, ``xp.linspace(a, b, n, dtype=xp.float64)``, ``xp.cumsum(a, 0)`` ...:
the spellings numpy and torch share) and adds the few operations whose spelling differs (``asarray`` onto the
device of ``like``, ``astype``, ``ones``, ``no_grad``, ``errstate``, ``noise_sampler``). The idea is the Python array
API standard's ``array_namespace`` (array-api-compat), cut down to what fewstep's update rules need.

Importing this module imports numpy only; torch is imported when a torch namespace is first asked for, so the
torch-free ONNX runtime (``core.export``) runs the same update rules as the torch core.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

Array = Any  # np.ndarray | torch.Tensor (torch is not imported here)
NoiseSampler = Callable[[Array, Array], Array]


class _Namespace:
    """Forwards attribute access to the array module (``numpy`` or ``torch``)."""

    name: str
    module: Any

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.module, attr)

    def __repr__(self) -> str:
        return f"<array namespace {self.name}>"


class _Numpy(_Namespace):
    name = "numpy"
    module = np

    def asarray(self, v: Any, dtype: Any = None, like: Any = None) -> np.ndarray:
        return np.asarray(v, dtype=dtype)

    def astype(self, x: Any, dtype: Any) -> np.ndarray:
        return np.asarray(x).astype(dtype)

    def ones(self, n: int, like: np.ndarray) -> np.ndarray:
        return np.ones(n, like.dtype)

    def no_grad(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def errstate(self) -> contextlib.AbstractContextManager:
        """Silence log(0) = -inf and inf/inf warnings (a flow model at sigma = 1 has alpha = 0: lambda = -inf)."""
        return np.errstate(divide="ignore", invalid="ignore")

    def noise_sampler(self, x: np.ndarray, seed: int | None = None) -> NoiseSampler:
        """Fresh standard normal noise per call from numpy's PCG64 (not torch's stream: pass a ``noise_sampler`` to
        reproduce a torch run)."""
        rng = np.random.default_rng(seed)
        return lambda sigma, sigma_next: rng.standard_normal(x.shape, dtype=x.dtype)


class _Torch(_Namespace):
    name = "torch"

    @property
    def module(self) -> Any:  # type: ignore[override]
        import torch

        return torch

    def asarray(self, v: Any, dtype: Any = None, like: Any = None) -> Any:
        return self.module.as_tensor(v, dtype=dtype, device=None if like is None else like.device)

    def astype(self, x: Any, dtype: Any) -> Any:
        return self.module.as_tensor(x).to(dtype)

    def ones(self, n: int, like: Any) -> Any:
        return like.new_ones([n])

    def no_grad(self) -> contextlib.AbstractContextManager:
        return self.module.no_grad()

    def errstate(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def noise_sampler(self, x: Any, seed: int | None = None) -> NoiseSampler:
        """Fresh Gaussian noise per call, seeded like ComfyUI's ``default_noise_sampler`` since 0.6.0 (``seed + 1``
        on the CPU, ``seed`` on an accelerator)."""
        torch = self.module
        generator = None
        if seed is not None:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(int(seed) + 1 if x.device.type == "cpu" else int(seed))
        return lambda sigma, sigma_next: torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device,
                                                     generator=generator)


NAMESPACES: dict[str, _Namespace] = {"numpy": _Numpy(), "torch": _Torch()}


def namespace(name: str) -> _Namespace:
    """The array namespace called ``name`` (``"numpy"`` or ``"torch"``)."""
    try:
        return NAMESPACES[name]
    except KeyError:
        raise ValueError(f"unknown array namespace {name!r}; choose one of {', '.join(NAMESPACES)}") from None


def array_namespace(*xs: Any) -> _Namespace:
    """The namespace of the first array among ``xs`` (python numbers are skipped; none at all gives numpy)."""
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported: never import it here
    for x in xs:
        if isinstance(x, (np.ndarray, np.generic)):
            return NAMESPACES["numpy"]
        if torch is not None and isinstance(x, torch.Tensor):
            return NAMESPACES["torch"]
        if not isinstance(x, (int, float, bool)) and x is not None:
            raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")
    return NAMESPACES["numpy"]
