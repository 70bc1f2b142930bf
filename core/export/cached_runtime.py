"""Sample an export with its learned cache on (``core.export.learned_cache``) with numpy + onnxruntime only.

``OnnxLearnedCacheDenoiser`` is an ``OnnxDenoiser`` that runs, per call of a sampling run, either the full graph
(keeping the cached range's input and residual, as ``core.cache.learned.LearnedCache.update`` does) or, at the call
indices of the skip plan, the partial graph with the kept state (the predictor in place of the range, as
``LearnedCache.predict``). The state machine is core's: a run starts when sigma rises (or the batch shape changes);
a skip with no state of the same shape computes instead. ``OnnxLearnedPlanDenoiser`` does the same for an exported
learned-cache plan (``core.export.learned_plan``: a partial graph per planned call). Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..sampling.schedules import starts_new_run
from .metadata import OnnxModelError
from .runtime import OnnxDenoiser

__all__ = ["OnnxLearnedCacheDenoiser", "OnnxLearnedPlanDenoiser"]


class OnnxLearnedCacheDenoiser(OnnxDenoiser):
    """``D(x, sigma, **cond) -> x0`` with the exported learned cache on (see the module docstring).

    Args:
        path: the full graph written by ``export_learned_cache`` (its partial graph is found next to it).
        skip_steps: call indices of a run whose range is predicted (default: the exported plan).
        providers, threads: as ``OnnxDenoiser`` (both graphs use them); IO binding is not used.
    """

    def __init__(self, path: str | Path, skip_steps: Sequence[int] | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        super().__init__(path, providers=providers, io_binding=False, threads=threads)
        plan = self.meta.get("learned_cache")
        if not isinstance(plan, dict):
            raise OnnxModelError(f"{self.path} has no learned cache (export it with export_learned_cache)")
        self.plan = plan
        self.partial = OnnxDenoiser(self.path.with_name(plan["partial"]), providers=providers, io_binding=False,
                                    threads=threads)
        steps = sorted({int(s) for s in (plan["skip_steps"] if skip_steps is None else skip_steps)})
        if steps and steps[0] < 1:
            raise ValueError(f"skip_steps must be call indices >= 1 (call 0 computes the first residual), got {steps}")
        self.skip_steps = frozenset(steps)
        self.features = list(plan["feature_outputs"])
        self.cache_inputs = list(plan["cache_inputs"])
        self.stats = {"calls": 0, "computed": 0, "skipped": 0, "runs": 0}
        self.reset()

    def reset(self) -> None:
        """Forget the cached state (a new sampling run also starts by itself when sigma rises)."""
        self._step, self._sigma = 0, None
        self._h: np.ndarray | None = None
        self._r: np.ndarray | None = None
        self._sigma_c: float | None = None
        self._s: float | None = None

    def __call__(self, x: np.ndarray, sigma: Any, **cond: Any) -> np.ndarray:
        s = float(np.asarray(sigma, dtype=np.float32).reshape(-1)[0])
        if starts_new_run(self._sigma, s):
            self.reset()
            self.stats["runs"] += 1
        self._sigma, self._s = s, s
        return super().__call__(x, sigma, **cond)

    def network(self, x_in: np.ndarray, timestep: np.ndarray, **inputs: Any) -> np.ndarray:
        """One call: the partial graph at a planned skip with state of the same shape, else the full graph."""
        s, step = self._s, self._step
        self._step += 1
        self.stats["calls"] += 1
        b = x_in.shape[0]
        skip = step in self.skip_steps and self._r is not None and self._r.shape[0] == b
        if skip:
            h_c, r_c, sig, sig_c = self.cache_inputs
            state = {h_c: self._h, r_c: self._r, sig: np.full(b, s, np.float32),
                     sig_c: np.full(b, self._sigma_c, np.float32)}
            self.stats["skipped"] += 1
            return self.partial.network(x_in, timestep, **inputs, **state)
        out, self._h, self._r = self.run_outputs([self.output, *self.features], x_in, timestep, **inputs)
        self._sigma_c = s
        self.stats["computed"] += 1
        return out


class OnnxLearnedPlanDenoiser(OnnxDenoiser):
    """``D(x, sigma, **cond) -> x0`` with an exported learned-cache *plan* on (``core.export.learned_plan``): per call
    of a sampling run either the full graph (keeping the range input and every planned range's residual, as
    ``core.cache.learned.LearnedPlanCache.update`` / ``observe`` do) or, at a planned call ``k``, call ``k``'s partial
    graph with the kept state. Core's state machine: the call index advances with each new sigma and a run starts
    when sigma rises; a planned call with no state of the same batch computes instead.

    Args:
        path: the full graph written by ``export_learned_plan`` (its partial graphs are found next to it).
        providers, threads: as ``OnnxDenoiser`` (every graph uses them); IO binding is not used.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        super().__init__(path, providers=providers, io_binding=False, threads=threads)
        meta = self.meta.get("learned_cache_plan")
        if not isinstance(meta, dict):
            raise OnnxModelError(f"{self.path} has no learned-cache plan (export it with export_learned_plan)")
        self.plan = {int(k): int(n) for k, n in meta["plan"].items()}
        self.partials = {int(k): OnnxDenoiser(self.path.with_name(f), providers=providers, io_binding=False,
                                              threads=threads) for k, f in meta["partials"].items()}
        self.residuals = {int(k): n for k, n in meta["residual_outputs"].items()}
        self.features = [meta["range_input"], *sorted(set(self.residuals.values()))]
        self.cache_inputs = list(meta["cache_inputs"])
        self.stats = {"calls": 0, "computed": 0, "skipped": 0, "runs": 0}
        self.reset()

    def reset(self) -> None:
        """Forget the cached state (a new sampling run also starts by itself when sigma rises)."""
        self._call, self._sigma = -1, None
        self._h: np.ndarray | None = None
        self._res: dict[str, np.ndarray] = {}
        self._sigma_c: float | None = None

    def __call__(self, x: np.ndarray, sigma: Any, **cond: Any) -> np.ndarray:
        s = float(np.asarray(sigma, dtype=np.float32).reshape(-1)[0])
        if starts_new_run(self._sigma, s):
            self.reset()
            self._call = 0
            self.stats["runs"] += 1
        elif s != self._sigma:
            self._call += 1
        self._sigma = s
        return super().__call__(x, sigma, **cond)

    def network(self, x_in: np.ndarray, timestep: np.ndarray, **inputs: Any) -> np.ndarray:
        """One call: call ``k``'s partial graph at a planned call with state of the same batch, else the full graph."""
        k, s, b = self._call, self._sigma, x_in.shape[0]
        self.stats["calls"] += 1
        if k in self.plan and self._h is not None and self._h.shape[0] == b:
            h_c, r_c, sig, sig_c = self.cache_inputs
            state = {h_c: self._h, r_c: self._res[self.residuals[k]], sig: np.full(b, s, np.float32),
                     sig_c: np.full(b, self._sigma_c, np.float32)}
            self.stats["skipped"] += 1
            return self.partials[k].network(x_in, timestep, **inputs, **state)
        out, self._h, *res = self.run_outputs([self.output, *self.features], x_in, timestep, **inputs)
        self._res = dict(zip(self.features[1:], res))
        self._sigma_c = s
        self.stats["computed"] += 1
        return out
