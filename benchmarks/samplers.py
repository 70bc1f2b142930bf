"""Sampler accuracy on the Gaussian-mixture ground truth (``fewstep bench samplers``).

For every sampler and NFE in {1, 2, 4, 8, 16, 32}: RMS distance of each sample to the exact ODE solution from
the same noise (a fine Heun solve), and sliced Wasserstein distance to samples of the mixture. Then the
searched step schedule against karras / uniform at 4, 6 and 8 NFE on held-out noise. JSON + PNG.
"""

from __future__ import annotations

import argparse
import time

import torch

from fewstep.core.metrics.sliced import sliced_wasserstein
from fewstep.core.models import DiscreteVP, GaussianMixtureDenoiser, toy_mixture
from fewstep.core.sampling import NFE, fine_solution, get_sampler, get_sigmas, search_schedule

from ..core import io
from ..core.checks import positive_int
from .common import machine, write_json

SAMPLERS = ["euler", "heun", "dpmpp_2m", "uni_pc", "euler_ancestral", "lcm", "tcd", "dmd", "onestep"]
NFES = [1, 2, 4, 8, 16, 32]


def _steps(sampler: str, nfe: int) -> int | None:
    ok = [n for n in range(1, nfe + 1) if NFE[sampler](n) <= nfe]
    return max(ok) if ok else None


def run(n: int = 1024, dim: int = 2, seed: int = 0) -> dict:
    ms = DiscreteVP("eps", "scaled_linear")
    den = GaussianMixtureDenoiser(toy_mixture(dim=dim, components=8), ms)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g) * ms.sigma_max
    ref = fine_solution(den, x, get_sigmas("karras", ms, 128), substeps=8)[-1]
    data = den.mixture.sample(n, generator=torch.Generator().manual_seed(seed + 1))
    floor = sliced_wasserstein(den.mixture.sample(n, generator=torch.Generator().manual_seed(seed + 2)), data)
    rows = []
    for name in SAMPLERS:
        for nfe in NFES:
            steps = _steps(name, nfe)
            if steps is None or (name == "onestep" and nfe > 1):
                continue
            sig = get_sigmas("karras", ms, steps)
            out = get_sampler(name)(den, x, sig, extra_args={"seed": seed}, disable=True)
            rows.append({"sampler": name, "nfe_budget": nfe, "nfe": NFE[name](steps), "steps": steps,
                         "ode_rms_error": float(((out - ref) ** 2).mean().sqrt()),
                         "sliced_wasserstein": sliced_wasserstein(out, data)})
    search_rows = []
    x_train = torch.randn(128, dim, generator=torch.Generator().manual_seed(seed + 10)) * ms.sigma_max
    for sampler in ("euler", "dpmpp_2m"):
        for nfe in (4, 6, 8):
            t0 = time.perf_counter()
            sig = search_schedule(den, x_train, nfe, sampler=sampler, grid_size=32)
            secs = time.perf_counter() - t0
            row = {"sampler": sampler, "nfe": nfe, "searched_sigmas": [round(float(s), 4) for s in sig],
                   "search_seconds": round(secs, 2)}
            for label, s in (("searched", sig), ("karras", get_sigmas("karras", ms, nfe)),
                             ("uniform", get_sigmas("uniform", ms, nfe))):
                out = get_sampler(sampler)(den, x, s, disable=True)
                row[f"{label}_error"] = float(((out - ref) ** 2).mean().sqrt())
            row["gain_vs_karras"] = row["karras_error"] / row["searched_error"]
            row["gain_vs_uniform"] = row["uniform_error"] / row["searched_error"]
            search_rows.append(row)
    return {"benchmark": "samplers_gaussian_mixture", "dim": dim, "n": n, "model_sampling": ms.config(),
            "schedule": "karras", "sliced_wasserstein_floor": floor, "rows": rows, "schedule_search": search_rows,
            "machine": machine()}


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in SAMPLERS:
        r = [row for row in result["rows"] if row["sampler"] == name]
        if not r:
            continue
        axes[0].loglog([x["nfe"] for x in r], [x["ode_rms_error"] for x in r], "o-", label=name)
        axes[1].semilogx([x["nfe"] for x in r], [x["sliced_wasserstein"] for x in r], "o-", label=name)
    axes[1].axhline(result["sliced_wasserstein_floor"], color="k", ls=":", label="sampling floor")
    axes[0].set(xlabel="NFE", ylabel="RMS error to exact ODE solution", title="ODE error")
    axes[1].set(xlabel="NFE", ylabel="sliced Wasserstein to data", title="distribution error")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=positive_int, default=1024)
    p.add_argument("--dim", type=positive_int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    result = run(args.n, args.dim)
    path = write_json(result, f"samplers_gmm{args.dim}d.json", args.out)
    plot(result, path.with_suffix(".png"))
    floor = result["sliced_wasserstein_floor"]
    for key, title in (("ode_rms_error", "RMS error to the exact ODE solution (deterministic samplers)"),
                       ("sliced_wasserstein", f"sliced Wasserstein to data (floor {floor:.3f})")):
        print(title)
        print(f"{'sampler':16s} " + " ".join(f"NFE{n:>3d}" for n in NFES))
        for name in SAMPLERS:
            r = {x["nfe_budget"]: x[key] for x in result["rows"] if x["sampler"] == name}
            print(f"{name:16s} " + " ".join(f"{r[n]:6.3f}" if n in r else "     -" for n in NFES))
    for r in result["schedule_search"]:
        print(f"search {r['sampler']:9s} NFE {r['nfe']}: searched {r['searched_error']:.4f}  karras "
              f"{r['karras_error']:.4f} ({r['gain_vs_karras']:.2f}x)  uniform {r['uniform_error']:.4f} "
              f"({r['gain_vs_uniform']:.2f}x)")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
