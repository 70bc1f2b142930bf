"""``LearnedPlanCache``: a learned cache whose skipped block range differs per call of the sampling run.

On a few-step student the calls of a run are far from equally sensitive: on the embedded 4-step consistency student,
reusing the *whole* block stack at call 1 keeps 45 dB to the uncached sample, the same reuse at call 2 34 dB and at
call 3 20 dB (``benchmarks/caching_learned.py``). One block range skipped on a fixed set of calls (``LearnedCache``)
spends its savings where they cost most; a *plan* gives each call its own range, e.g. ``{1: 5, 2: 2}`` on a 5-block
DiT: all five blocks at call 1, the first two at call 2, 13 of 20 block evaluations.

Per skipped call ``k`` of the plan a ``ResidualPredictor`` (Eq. (1) of ``predictor.py``) predicts the residual of
``[head, head + plan[k])`` from the hidden state entering it now and that range's residual at the last computed call
``c`` -- as DisCa (Zou et al. 2025) predicts skipped features with a light learned network; one predictor per call
because the blocks and the step differ. Computed calls record the hidden state after every block that ends a planned
range (``BlockCache.observed_blocks``; the runner hands them over), so one full compute serves every later skip.

Training pairs for call ``k`` come from runs in which the plan (with the predictors of the earlier calls) already
acts on the calls before ``k`` (``plan_pairs``): the inputs the predictor sees at sampling time, not those of an
uncached trajectory, with exact targets (call ``k`` itself runs in full there).

The call index is counted per sigma (a new sigma = the next call; a rising sigma = a new run), so calls of several
guidance branches at one sigma share it. State (last compute) is kept per key and reset with the run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...io import read_safetensors
from ...sampling.schedules import starts_new_run
from ..caches import BlockCache
from ..options import CacheConfigError
from ..tensors import sigma_value
from .cache import Feature, _hidden, _with_hidden
from .predictor import ResidualPredictor
from .store import check_identity, model_identity, read_header, write_with_header
from .trajectories import _hidden_in, _hidden_out


def check_plan(plan: Mapping[int, int], head_blocks: int = 0) -> dict[int, int]:
    """``{call index >= 1: blocks skipped >= 1}`` as ints, or ``CacheConfigError`` naming the bad entry."""
    out: dict[int, int] = {}
    for k, n in dict(plan).items():
        if int(k) < 1 or int(n) < 1:
            raise CacheConfigError(f"plan entry {k}: {n}: need call index >= 1 (call 0 computes the first residuals) "
                                   "and >= 1 skipped block, e.g. {1: 5, 2: 2}")
        out[int(k)] = int(n)
    if head_blocks < 0:
        raise CacheConfigError(f"head_blocks must be >= 0, got {head_blocks}")
    return dict(sorted(out.items()))


class _State:
    __slots__ = ("h_c", "outs", "sigma_c", "pending")

    def __init__(self) -> None:
        self.h_c: Tensor | None = None
        self.outs: dict[int, Tensor] = {}  # range end b -> hidden leaving block b - 1 at the last compute
        self.sigma_c: float | None = None
        self.pending: tuple[bool, int, float] | None = None


class LearnedPlanCache(BlockCache):
    """Learned block cache on a per-call plan (see the module docstring).

    Args:
        plan: ``{call index: number of blocks skipped}``; call ``k`` predicts ``[head_blocks, head_blocks + n)``.
            Calls not in the plan compute every block.
        predictors: ``{call index: ResidualPredictor}`` for every call of the plan (missing or None: plain reuse of
            the range's residual at the last compute, i.e. a zero predictor).
        head_blocks: blocks that always run before every planned range.
        identity: the model fingerprint the predictors were trained for (``store.model_identity``).
    """

    def __init__(self, plan: Mapping[int, int], predictors: Mapping[int, ResidualPredictor | None] | None = None, *,
                 head_blocks: int = 0, identity: dict[str, str] | None = None) -> None:
        super().__init__(1.0, indicator="interval")
        self.plan = check_plan(plan, head_blocks)
        self.head_blocks = int(head_blocks)
        preds = dict(predictors or {})
        extra = sorted(set(preds) - set(self.plan))
        if extra:
            raise CacheConfigError(f"predictors for calls {extra} that the plan {self.plan} does not skip")
        for k, p in preds.items():
            if p is not None and not isinstance(p, ResidualPredictor):
                raise TypeError(f"predictor of call {k} must be a ResidualPredictor, got {type(p).__name__}")
        self.predictors = {int(k): p.eval().requires_grad_(False) for k, p in preds.items() if p is not None}
        self.identity = identity
        self._call, self._sigma = -1, None
        self._state: dict[Hashable, _State] = {}
        self._num_blocks: int | None = None

    def config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "plan": self.plan, "head_blocks": self.head_blocks,
                "predictors": {k: p.config() for k, p in self.predictors.items()}}

    def __repr__(self) -> str:
        return (f"LearnedPlanCache(plan={self.plan}, head_blocks={self.head_blocks}, "
                f"learned calls={sorted(self.predictors)})")

    def fresh(self) -> LearnedPlanCache:
        """A new cache on the same plan and (shared, read-only) predictors with no state or statistics: one per
        sampling run in a host that keeps the loaded plan (the ComfyUI node)."""
        return LearnedPlanCache(self.plan, self.predictors, head_blocks=self.head_blocks, identity=self.identity)

    def block_evals(self, num_blocks: int, calls: int) -> int:
        """Block evaluations of one run of ``calls`` calls under this plan (uncached: ``num_blocks * calls``)."""
        return num_blocks * calls - sum(n for k, n in self.plan.items() if k < calls)

    # ------------------------------------------------------------------ runner interface
    def block_range(self, num_blocks: int, sigma: float) -> tuple[int, int, Hashable]:
        a = self.head_blocks
        bad = {k: n for k, n in self.plan.items() if a + n > num_blocks}
        if bad:
            raise CacheConfigError(f"plan {bad} with head_blocks={a} skips past the model's {num_blocks} blocks")
        self._num_blocks = num_blocks
        if sigma == float("inf"):  # the runner's validation call
            return a, num_blocks, None
        if self._sigma is None or starts_new_run(self._sigma, sigma):
            self._call = 0
            self._state.clear()
            self.stats["runs"] += 1
        elif sigma != self._sigma:
            self._call += 1
        self._sigma = sigma
        n = self.plan.get(self._call)
        return (a, a + n, ("skip", self._call)) if n is not None else (a, num_blocks, None)

    def observed_blocks(self) -> frozenset[int]:
        return frozenset(self.head_blocks + n - 1 for n in self.plan.values())

    def signal_source(self) -> str | None:
        return None

    def reset(self) -> None:
        super().reset()
        self._call, self._sigma = -1, None
        self._state.clear()

    # ------------------------------------------------------------------ the three verbs (+ observe)
    def should_compute(self, x: Feature, sigma: Tensor | float, key: Hashable = None, *,
                       signal: Tensor | None = None, region: Hashable = None) -> bool:
        s = sigma_value(sigma)
        st = self._state.setdefault(key, _State())
        h = _hidden(x)
        n = self.plan.get(self._call)
        compute = n is None
        if not compute:
            b = self.head_blocks + n
            out = st.outs.get(b)
            if st.h_c is None or out is None or st.h_c.shape != h.shape or st.h_c.device != h.device:
                compute = True  # nothing computed for this key / shape yet: run the range (recorded as usual)
                self.stats["forced"] += 1
        if compute:  # a new reference: its range ends are recorded afresh (``observe``, then ``update``)
            st.outs = {}
        st.pending = (compute, self._call, s)
        self.stats["calls"] += 1
        return compute

    def _take(self, key: Hashable, compute: bool) -> tuple[_State, int, float]:
        st = self._state.get(key)
        if st is None or st.pending is None or st.pending[0] != compute:
            raise RuntimeError(f"LearnedPlanCache: should_compute(x, sigma, key={key!r}) must precede "
                               f"{'update' if compute else 'predict'} and agree with it")
        _, k, s = st.pending
        st.pending = None
        return st, k, s

    def observe(self, i: int, out: Feature, key: Hashable = None) -> None:
        """The hidden state leaving block ``i`` of a computed call (a planned range ends there)."""
        st = self._state.get(key)
        if st is not None and st.pending is not None and st.pending[0]:
            st.outs[i + 1] = _hidden(out)

    def update(self, x: Feature, out: Feature, key: Hashable = None) -> None:
        st, k, s = self._take(key, True)
        n = self.plan.get(k)
        end = self.head_blocks + n if n is not None else (self._num_blocks or 0)
        st.h_c = _hidden(x)
        st.outs[end] = _hidden(out)
        st.sigma_c = s
        self.stats["computed"] += 1

    def predict(self, x: Feature, key: Hashable = None) -> Feature:
        st, k, s = self._take(key, False)
        h = _hidden(x)
        b = self.head_blocks + self.plan[k]
        r_c = st.outs[b] - st.h_c
        pred = self.predictors.get(k)
        self.stats["skipped"] += 1
        self.stats["blocks_skipped_planned"] = self.stats.get("blocks_skipped_planned", 0) + self.plan[k]
        if pred is None:
            return _with_hidden(x, h + r_c)
        if next(pred.parameters()).device != h.device:
            pred.to(h.device)
        n = h.shape[0]
        r = pred(h, r_c, st.h_c, torch.full((n,), s, device=h.device),
                 torch.full((n,), float(st.sigma_c), device=h.device))
        return _with_hidden(x, h + r)


# ------------------------------------------------------------------------------------------------ training data
@contextlib.contextmanager
def _record_calls(net: nn.Module, blocks: list[nn.Module], head: int, ends: list[int],
                  sigma_of_call: Callable[[tuple, dict], Tensor]) -> Iterator[list[dict[str, Any]]]:
    """Per network call: sigma (first row), the hidden entering block ``head`` and the hidden leaving block ``b - 1``
    for every ``b`` in ``ends`` (where those blocks ran)."""
    calls: list[dict[str, Any]] = []

    def begin(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append({"sigma": float(sigma_of_call(args, kwargs).reshape(-1)[0]), "out": {}})

    def grab_in(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if calls:
            calls[-1]["h"] = _hidden_in(args, kwargs).detach().clone()

    def grab_out(b: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: tuple, _k: dict, out: Any) -> None:
            if calls:
                calls[-1]["out"][b] = _hidden_out(out).detach().clone()
        return hook

    handles = [net.register_forward_pre_hook(begin, with_kwargs=True),
               blocks[head].register_forward_pre_hook(grab_in, with_kwargs=True)]
    handles += [blocks[b - 1].register_forward_hook(grab_out(b), with_kwargs=True) for b in sorted(set(ends))]
    try:
        yield calls
    finally:
        for hd in handles:
            hd.remove()


@torch.no_grad()
def plan_pairs(sample: Callable[[LearnedPlanCache | None], Any], net: nn.Module, blocks: list[nn.Module],
               plan: Mapping[int, int], call: int, predictors: Mapping[int, ResidualPredictor],
               sigma_of_call: Callable[[tuple, dict], Tensor], head_blocks: int = 0) -> dict[str, Tensor]:
    """Training pairs (``Trajectories.pairs`` layout) for the predictor of ``call``: ``sample(cache)`` runs the
    sampler (one or more runs of equal length, same noise every time it is called) with ``cache`` applied (None:
    uncached); here the plan restricted to the calls before ``call`` acts, with ``predictors`` -- so the inputs are
    those of cached sampling -- while ``call`` and the last computed call before it run in full and give the targets."""
    plan = check_plan(plan, head_blocks)
    if call not in plan:
        raise ValueError(f"call {call} is not in the plan {plan}")
    prefix = {k: n for k, n in plan.items() if k < call}
    cache = LearnedPlanCache(prefix, {k: predictors.get(k) for k in prefix}, head_blocks=head_blocks) if prefix \
        else None
    b = head_blocks + plan[call]
    with _record_calls(net, blocks, head_blocks, [b], sigma_of_call) as calls:
        sample(cache)
    # split into runs (sigma rises) and index the calls within each run
    runs: list[list[dict[str, Any]]] = []
    for c in calls:
        if not runs or starts_new_run(runs[-1][-1]["sigma"], c["sigma"]):
            runs.append([])
        runs[-1].append(c)
    src = max((k for k in range(call) if k not in prefix), default=None)
    out: dict[str, list[Tensor]] = {k: [] for k in ("h", "r_c", "h_c", "r_t", "sigma_t", "sigma_c", "gap")}
    for run in runs:
        if len(run) <= call or src is None:
            continue
        t, c = run[call], run[src]
        if b not in t["out"] or b not in c["out"]:
            continue
        n = t["h"].shape[0]
        out["h"].append(t["h"])
        out["h_c"].append(c["h"])
        out["r_c"].append(c["out"][b] - c["h"])
        out["r_t"].append(t["out"][b] - t["h"])
        out["sigma_t"].append(torch.full((n,), t["sigma"]))
        out["sigma_c"].append(torch.full((n,), c["sigma"]))
        out["gap"].append(torch.full((n,), call - src))
    if not out["h"]:
        raise ValueError(f"no training pairs for call {call}: the recorded runs have fewer than {call + 1} calls")
    return {k: torch.cat(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ store
PLAN_FORMAT = "fewstep-learned-cache-plan/1"


def save_plan(path: str | Path, cache: LearnedPlanCache, identity: dict[str, str],
              meta: dict[str, Any] | None = None) -> Path:
    """Write a plan cache's predictors (tensors ``call<k>.<name>``) with the plan, ``head_blocks``, the model
    fingerprint and ``meta`` in the safetensors header; atomically (``store.write_with_header``)."""
    header = {"format": PLAN_FORMAT, "identity": identity, "plan": {str(k): n for k, n in cache.plan.items()},
              "head_blocks": cache.head_blocks,
              "predictors": {str(k): p.config() for k, p in cache.predictors.items()}, "meta": meta or {}}
    tensors = {f"call{k}.{name}": v for k, p in cache.predictors.items() for name, v in p.state_dict().items()}
    return write_with_header(path, tensors, header)


def load_plan(path: str | Path, model: nn.Module | None = None, identity: dict[str, str] | None = None,
              keys: tuple[str, ...] = ("config_hash", "weights_hash")) -> LearnedPlanCache:
    """A ``LearnedPlanCache`` from ``save_plan``'s file; with ``model`` (or its ``identity``) given, refuses one
    trained for another model (``LearnedCacheMismatchError`` naming both fingerprints) -- comparing the hashes
    ``keys`` (a host that cannot compute core's config hash, ComfyUI, compares ``("weights_hash",)``)."""
    header = read_header(path, PLAN_FORMAT, "learned-cache plan")
    if model is not None or identity is not None:
        check_identity(header["identity"], identity if identity is not None else model_identity(model),
                       what="plan", keys=keys)
    tensors, _ = read_safetensors(path)
    preds = {}
    for k, cfg in header["predictors"].items():
        p = ResidualPredictor(**cfg)
        p.load_state_dict({n[len(f"call{k}."):]: v for n, v in tensors.items() if n.startswith(f"call{k}.")})
        preds[int(k)] = p
    return LearnedPlanCache({int(k): n for k, n in header["plan"].items()}, preds,
                            head_blocks=int(header["head_blocks"]), identity=header["identity"])
