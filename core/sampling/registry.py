"""The one table of fewstep's samplers: name, function and the facts other layers need about it.

Pure Python (no numpy, no torch), so the ONNX metadata, the runtime, nodes, the CLI and tests all read the same
table. The functions themselves live in ``core.sampling.samplers`` (``SAMPLERS`` maps each name to its function,
built from this table); each is written once over an array namespace, so every sampler marked ``runtime`` runs
unchanged on numpy arrays in the torch-free ONNX runtime (``core.export``).

To add a sampler: write ``sample_<name>`` in ``samplers.py`` and add one ``SamplerSpec`` line here; the NFE test
and, for ``runtime=True``, the torch-vs-numpy parity test and the export metadata pick it up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _one_per_step(n: int) -> int:
    return n


def _heun(n: int) -> int:  # two evaluations per step, one on the last step to sigma = 0
    return 2 * n - 1


def _one(n: int) -> int:
    return 1


@dataclass(frozen=True)
class SamplerSpec:
    """What fewstep knows about one sampler.

    Args:
        name: the name users pass (``get_sampler(name)``, node options, ``--sampler``, ONNX metadata).
        function: the function's name in ``core.sampling.samplers``.
        family: ``"teacher"`` (an ODE/SDE solver for any model), ``"distilled"`` (the sampler a few-step student
            was trained for) or ``"composite"`` (runs other samplers).
        runtime: offered by the torch-free ONNX runtime (``core.export.np_sampling``; listed in the export
            metadata as a sampler an export may default to).
        ancestral: adds fresh noise every step (takes a ``noise_sampler``; seeded from ``extra_args["seed"]``).
        nfe: model evaluations for ``n`` steps.
    """

    name: str
    function: str
    family: str
    runtime: bool = False
    ancestral: bool = False
    nfe: Callable[[int], int] = _one_per_step


REGISTRY: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("euler", "sample_euler", "teacher", runtime=True),
    SamplerSpec("euler_ancestral", "sample_euler_ancestral", "teacher", ancestral=True),
    SamplerSpec("heun", "sample_heun", "teacher", nfe=_heun),
    SamplerSpec("dpmpp_2m", "sample_dpmpp_2m", "teacher", runtime=True),
    SamplerSpec("uni_pc", "sample_unipc", "teacher"),
    SamplerSpec("lcm", "sample_lcm", "distilled", runtime=True, ancestral=True),
    SamplerSpec("tcd", "sample_tcd", "distilled", ancestral=True),
    SamplerSpec("dmd", "sample_dmd", "distilled", runtime=True, ancestral=True),
    SamplerSpec("flow_map", "sample_flow_map", "distilled", runtime=True),
    SamplerSpec("onestep", "sample_onestep", "distilled", runtime=True, nfe=_one),
    SamplerSpec("hybrid", "sample_hybrid", "composite"),
)}

#: samplers the torch-free ONNX runtime offers, in registry order
RUNTIME_SAMPLERS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.runtime)
#: samplers that add fresh noise each step
ANCESTRAL_SAMPLERS: tuple[str, ...] = tuple(n for n, s in REGISTRY.items() if s.ancestral)
#: model evaluations a sampler spends on ``n`` steps
NFE: dict[str, Callable[[int], int]] = {n: s.nfe for n, s in REGISTRY.items()}


def spec(name: str) -> SamplerSpec:
    """The registry entry of sampler ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(REGISTRY)}") from None


def names(family: str | None = None, runtime: bool | None = None) -> tuple[str, ...]:
    """Sampler names, optionally of one ``family`` and/or with the given ``runtime`` flag, in registry order."""
    return tuple(n for n, s in REGISTRY.items()
                 if (family is None or s.family == family) and (runtime is None or s.runtime == runtime))
