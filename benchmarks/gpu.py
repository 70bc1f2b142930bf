"""Every GPU check in one short run (``fewstep bench gpu``), for the rare session that is lent an accelerator.

Parts, in order, within a total budget of ``BUDGET_S`` seconds (a part that would start past it is skipped, and
says so):

- ``triton``: the Triton block-sparse kernel against the dense reference, compiled on CUDA
  (``pytest tests/test_kernels_triton.py -m gpu`` in a subprocess; per-test outcomes);
- ``sparse_attention``: the kernel table, dense SDPA vs FlexAttention (compiled) vs Triton over sizes and
  densities (``benchmarks/sparse_attention.py --part kernels --quick``);
- ``onnx``: onnxruntime's CUDA execution provider, fp16 graph with IO binding, against torch eager fp16, per step
  and per sample (``benchmarks/onnx_speed.py``'s GPU case);
- ``sampling``: the teacher and the shipped students' sampling speed on the device, every setting of
  ``fewstep demo --quick`` timed in interleaved repeats, with the NFE ratio next to the wall ratio.

Writes ONE JSON (default ``benchmarks/results/gpu.json``) naming the device. Without a CUDA device it exits with a
message; ``--cpu-smoke`` runs each part tiny on the CPU instead (where it can run there) to check the pipeline and
the JSON schema (``validate``), writing ``gpu_cpu_smoke.json``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import machine, write_json

BUDGET_S = 480.0
PARTS = ("triton", "sparse_attention", "onnx", "sampling")
STATUSES = ("ok", "failed", "skipped")
VERSION = 1
TESTS = Path(__file__).resolve().parents[1] / "tests"


# ------------------------------------------------------------------------------------------------------ parts
def part_triton(device: str, smoke: bool, budget_s: float) -> dict[str, Any]:
    """The Triton kernel's CUDA parity tests (``-m gpu``) in a subprocess; every test's outcome."""
    if device != "cuda":
        return {"status": "skipped", "reason": "compiled Triton needs CUDA (the CPU interpreter cases run in the "
                                               "ordinary test suite: tests/test_kernels_triton.py)"}
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "triton.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_kernels_triton.py"),
               "-m", "gpu", f"--junitxml={xml}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10.0, budget_s))
        except subprocess.TimeoutExpired:
            return {"status": "failed", "reason": f"timed out after {budget_s:.0f} s", "command": " ".join(cmd[1:])}
        tests = _junit_outcomes(xml) if xml.exists() else {}
    passed = sum(v == "passed" for v in tests.values())
    ok = proc.returncode == 0 and passed > 0 and all(v in ("passed", "skipped") for v in tests.values())
    return {"status": "ok" if ok else "failed", "passed": passed, "total": len(tests), "tests": tests,
            "returncode": proc.returncode, "output_tail": (proc.stdout + proc.stderr)[-1500:],
            "command": "python " + " ".join(cmd[1:4] + cmd[5:7])}


def _junit_outcomes(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        out[case.get("name", "?")] = ("failed" if kinds & {"failure", "error"} else
                                      "skipped" if "skipped" in kinds else "passed")
    return out


def part_sparse_attention(device: str, smoke: bool, budget_s: float) -> dict[str, Any]:
    """Dense SDPA vs FlexAttention vs Triton, the quick kernel table of ``benchmarks/sparse_attention.py``."""
    from .sparse_attention import kernel_benchmark

    table = kernel_benchmark(quick=True, device=device, smoke=smoke)
    errors = [r for r in table["rows"] if "error" in r]
    bad = [r for r in table["rows"] if r.get("max_abs_err", 0.0) > (2e-2 if device == "cuda" else 1e-4)]
    status = "ok" if table["rows"] and not errors and not bad else "failed"
    return {"status": status, **table, "errors": len(errors), "parity_failures": len(bad)}


def part_onnx(device: str, smoke: bool, budget_s: float) -> dict[str, Any]:
    """onnxruntime CUDA EP fp16 + IO binding vs torch fp16 (on CPU with ``smoke``: the CPU cases, tiny)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"status": "skipped", "reason": "onnxruntime is not installed (pip install 'fewstep[onnx-gpu]')"}
    from .onnx_speed import run

    if device == "cuda":
        res = run(batch=10, steps=8, repeats=10, gpu=True, cpu=False)
        gpu = res.get("gpu", {})
        if "skipped" in gpu:
            return {"status": "skipped", "reason": gpu["skipped"], **res}
        ok = gpu.get("sample_rel_error_vs_torch_fp16", 1.0) < 5e-2
        return {"status": "ok" if ok else "failed", **res}
    res = run(batch=2, steps=2, repeats=1, gpu=False, cpu=True)
    ok = all(c["sample_rel_error"] < 1e-3 for c in res["cpu"])
    return {"status": "ok" if ok else "failed", **res}


def part_sampling(device: str, smoke: bool, budget_s: float) -> dict[str, Any]:
    """The teacher and every shipped student (the ``fewstep demo --quick`` settings) timed on ``device``."""
    from ..core.evaluate import CountingDenoiser, balanced_labels, generate, spread, time_settings
    from ..core.models.embedded import load_teacher
    from ..demo import demo_settings

    teacher = load_teacher().to(device)
    settings = demo_settings(quick=True)
    for st in settings:
        if st.denoiser is not None:
            st.denoiser.to(device)
    labels = balanced_labels(1 if smoke else 25)  # 10 or 250 samples: one batch
    repeats = 2 if smoke else 5
    nfes = []
    for st in settings:  # warm-up run per setting; counts the network evaluations per sample
        counter = CountingDenoiser(st.denoiser or teacher)
        generate(teacher, st, labels, counter=counter, device=device)
        nfes.append(counter.sample_evals / len(labels))
    times = time_settings(teacher, settings, labels, repeats=repeats, device=device)
    base = statistics.median(times[0])
    rows = [{"setting": st.name, "sampler": st.sampler, "cfg": st.cfg, "nfe": nfe,
             "ms_per_batch": round(1e3 * statistics.median(ts), 3), "ms_repeats": [round(1e3 * t, 3) for t in ts],
             "spread": round(spread(ts), 3), "speedup": round(base / statistics.median(ts), 3),
             "nfe_ratio": round(nfes[0] / nfe, 3)} for st, nfe, ts in zip(settings, nfes, times)]
    return {"status": "ok", "batch": len(labels), "repeats": repeats, "baseline": settings[0].name,
            "timing_noisy": spread(times[0]) > 0.15, "rows": rows}


RUNNERS: dict[str, Callable[[str, bool, float], dict[str, Any]]] = {
    "triton": part_triton, "sparse_attention": part_sparse_attention, "onnx": part_onnx, "sampling": part_sampling}


# ------------------------------------------------------------------------------------------------------- run
def run(smoke: bool = False, parts: tuple[str, ...] = PARTS, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Run ``parts`` in order on CUDA (or tiny on the CPU with ``smoke``); one failing part does not stop the rest."""
    device = "cpu" if smoke else "cuda"
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "gpu", "version": VERSION, "smoke": smoke, "budget_s": budget_s,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "machine": machine(),
        "command": "fewstep bench gpu" + (" --cpu-smoke" if smoke else ""), "parts": {}}
    for name in parts:
        left = budget_s - (time.perf_counter() - t_start)
        if left <= 0:
            result["parts"][name] = {"status": "skipped", "reason": f"time budget of {budget_s:.0f} s used up",
                                     "seconds": 0.0}
            continue
        t0 = time.perf_counter()
        print(f"[bench gpu] {name} ({left:.0f} s of budget left)", flush=True)
        try:
            out = RUNNERS[name](device, smoke, left)
        except Exception as e:  # noqa: BLE001 - a part's failure is recorded, the other parts still run
            out = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:500],
                   "traceback": traceback.format_exc()[-2000:]}
        out["seconds"] = round(time.perf_counter() - t0, 2)
        result["parts"][name] = out
        print(f"[bench gpu] {name}: {out['status']} in {out['seconds']:.0f} s"
              + (f" ({out['reason']})" if out.get("reason") else ""), flush=True)
    result["total_s"] = round(time.perf_counter() - t_start, 2)
    validate(result)
    return result


def validate(result: dict[str, Any]) -> None:
    """Check the structure of a ``gpu.json`` result; raise ``ValueError`` naming what is wrong."""
    for key, kind in (("benchmark", str), ("version", int), ("device", str), ("smoke", bool), ("machine", dict),
                      ("parts", dict), ("total_s", float), ("budget_s", float)):
        if not isinstance(result.get(key), kind):
            raise ValueError(f"gpu result: {key!r} must be a {kind.__name__}, got {result.get(key)!r}")
    if set(result["parts"]) - set(PARTS):
        raise ValueError(f"gpu result: unknown parts {sorted(set(result['parts']) - set(PARTS))}")
    for name, part in result["parts"].items():
        if part.get("status") not in STATUSES:
            raise ValueError(f"gpu result: part {name!r} status must be one of {STATUSES}, got {part.get('status')!r}")
        if not isinstance(part.get("seconds"), float):
            raise ValueError(f"gpu result: part {name!r} lacks its seconds")
        if part["status"] != "ok" and not (part.get("reason") or part.get("tests")):
            raise ValueError(f"gpu result: part {name!r} is {part['status']} without a reason")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run each part tiny on the CPU to check the pipeline and the JSON (not a measurement)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="total seconds; later parts are skipped past it")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args(argv)
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    if unknown := [x for x in parts if x not in PARTS]:
        p.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if not a.cpu_smoke and not torch.cuda.is_available():
        print("fewstep bench gpu: no CUDA device here (torch.cuda.is_available() is False); this command runs the "
              "GPU checks on a machine with an NVIDIA GPU. To check the pipeline on this CPU: fewstep bench gpu "
              "--cpu-smoke", file=sys.stderr)
        return 2
    res = run(smoke=a.cpu_smoke, parts=parts, budget_s=float(a.budget))
    path = write_json(res, "gpu_cpu_smoke.json" if a.cpu_smoke else "gpu.json", a.out)
    failed = [n for n, part in res["parts"].items() if part["status"] == "failed"]
    print(f"[bench gpu] {res['device']}: " + ", ".join(f"{n} {part['status']}" for n, part in res["parts"].items())
          + f" in {res['total_s']:.0f} s; wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
