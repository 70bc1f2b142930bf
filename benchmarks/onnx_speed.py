"""onnxruntime vs torch eager on the embedded teacher, as speed ratios in one run (``fewstep bench onnx``).

Run: ``python -m fewstep.benchmarks.onnx_speed [--threads N] [--quick] [--plot]``.

CPU: per step (one denoiser evaluation) and per full sample (DPM-Solver++(2M), 8 steps), for the plain graph at
batch B and the CFG-folded graph (cond + uncond in one pass), timed interleaved in one run and reported as ratios
``torch time / onnxruntime time`` (DESIGN.md: no absolute CPU seconds). Threads are pinned to the same count for
both. The sample parity (ORT vs torch from the same noise) is reported next to the speed.

GPU (when torch sees CUDA and onnxruntime has the CUDA execution provider): the fp16 graph on the CUDA EP with IO
binding vs torch eager fp16, in milliseconds and as ratios, naming the device.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.core.guidance import CFGDenoiser
from fewstep.core.models.embedded import build_dit, dit_denoiser, load_teacher
from fewstep.core.sampling import get_sigmas, sample_dpmpp_2m

from ..core import io
from ..core.checks import finite_float, positive_int
from .common import machine, write_json


def _teacher() -> tuple[Any, str]:
    try:
        return load_teacher(), "trained"
    except FileNotFoundError:
        torch.manual_seed(0)
        return dit_denoiser(build_dit().eval().requires_grad_(False)), "random (teacher weights missing)"


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, sync: Callable[[], None] | None = None
                 ) -> dict[str, float]:
    """Median seconds of each function, run alternately (order flipped every repeat) after one warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    keys = list(fns)
    for r in range(repeats):
        for k in keys if r % 2 == 0 else keys[::-1]:
            if sync:
                sync()
            t0 = time.perf_counter()
            fns[k]()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


def _cpu_case(name: str, den: Any, onnx_model: Any, batch: int, steps: int, repeats: int, cfg: float | None
              ) -> dict[str, Any]:
    from fewstep.core.export.np_sampling import sample_dpmpp_2m as np_dpmpp_2m

    ms = den.model_sampling
    g = torch.Generator().manual_seed(0)
    y = torch.arange(batch) % 10
    sig = torch.full((batch,), 5.0)
    x = torch.randn(batch, 1, 16, 16, generator=g) * (26.0**0.5)
    torch_model = den if cfg is None else CFGDenoiser(den, cfg, null=10)
    sigmas = get_sigmas("karras", ms, steps)
    x_start = torch.randn(batch, 1, 16, 16, generator=g) * float(sigmas[0])
    xn, yn, sn, sigmas_n, x_start_n = x.numpy(), y.numpy(), sig.numpy(), sigmas.numpy(), x_start.numpy()
    extra = {} if cfg is None else {"guidance_scale": cfg}

    def torch_step():
        with torch.inference_mode():
            return torch_model(x, sig, class_labels=y)

    def ort_step():
        return onnx_model(xn, sn, class_labels=yn, **extra)

    def torch_sample():
        with torch.inference_mode():
            return sample_dpmpp_2m(torch_model, x_start, sigmas, extra_args={"class_labels": y}, disable=True)

    def ort_sample():
        return np_dpmpp_2m(onnx_model, x_start_n, sigmas_n, extra_args={"class_labels": yn, **extra})

    step = _interleaved({"torch": torch_step, "ort": ort_step}, repeats)
    sample = _interleaved({"torch": torch_sample, "ort": ort_sample}, max(3, repeats // 4))
    return {
        "case": name, "batch": batch, "forward_batch": batch * (2 if cfg else 1), "steps": steps,
        "speedup_per_step": step["torch"] / step["ort"],
        "speedup_per_sample": sample["torch"] / sample["ort"],
        "sample_rel_error": _rel(ort_sample(), torch_sample().numpy()),
    }


def _gpu_case(den: Any, path16: Path, batch: int, steps: int, repeats: int, cfg: float) -> dict[str, Any]:
    from fewstep.core.export.np_sampling import sample_dpmpp_2m as np_dpmpp_2m
    from fewstep.core.export.runtime import OnnxDenoiser

    dev = torch.device("cuda")
    model = OnnxDenoiser(path16, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    if not model.on_cuda:
        return {"skipped": f"onnxruntime fell back to {model.providers}"}
    den16 = dit_denoiser(copy.deepcopy(den.model).half().to(dev), den.model_sampling, name="teacher-fp16")
    torch_model = CFGDenoiser(den16, cfg, null=10)
    ms = den.model_sampling
    sigmas = get_sigmas("karras", ms, steps)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(batch) % 10
    x = torch.randn(batch, 1, 16, 16, generator=g) * float(sigmas[0])
    x16, y16, sig16 = x.to(dev, torch.float16), y.to(dev), sigmas.to(dev)
    xn, yn, sn = x.numpy(), y.numpy(), sigmas.numpy()
    sig_step = torch.full((batch,), 5.0, device=dev)

    def torch_step():
        with torch.inference_mode():
            return torch_model(x16, sig_step, class_labels=y16)

    def ort_step():
        return model(xn, np.full(batch, 5.0, np.float32), class_labels=yn, guidance_scale=cfg)

    def torch_sample():
        with torch.inference_mode():
            return sample_dpmpp_2m(torch_model, x16, sig16, extra_args={"class_labels": y16}, disable=True)

    def ort_sample():
        return np_dpmpp_2m(model, xn, sn, extra_args={"class_labels": yn, "guidance_scale": cfg})

    sync = torch.cuda.synchronize
    step = _interleaved({"torch": torch_step, "ort": ort_step}, repeats, sync)
    sample = _interleaved({"torch": torch_sample, "ort": ort_sample}, max(3, repeats // 4), sync)
    return {
        "device": torch.cuda.get_device_name(0), "precision": "fp16", "io_binding": model.io_binding,
        "batch": batch, "forward_batch": 2 * batch, "steps": steps,
        "torch_ms_per_step": 1e3 * step["torch"], "ort_ms_per_step": 1e3 * step["ort"],
        "torch_ms_per_sample": 1e3 * sample["torch"], "ort_ms_per_sample": 1e3 * sample["ort"],
        "speedup_per_step": step["torch"] / step["ort"], "speedup_per_sample": sample["torch"] / sample["ort"],
        "sample_rel_error_vs_torch_fp16": _rel(ort_sample(), torch_sample().float().cpu().numpy()),
    }


def run(batch: int = 10, steps: int = 8, repeats: int = 20, threads: int | None = None, cfg: float = 2.0,
        gpu: bool = True, cpu: bool = True) -> dict[str, Any]:
    """The CPU cases (unless ``cpu=False``) and the GPU case (when ``gpu`` and a CUDA device and execution provider
    are there); the result dict is what ``onnx_speed.json`` holds."""
    import onnxruntime as ort

    from fewstep.core.export.exporter import export_onnx
    from fewstep.core.export.fp16 import convert_file_to_fp16
    from fewstep.core.export.runtime import OnnxDenoiser

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    den, weights = _teacher()
    result: dict[str, Any] = {"benchmark": "onnx_speed", "model": "embedded digits DiT teacher", "weights": weights,
                              "machine": machine(), "onnxruntime": ort.__version__, "threads": threads,
                              "ratio": "torch eager time / onnxruntime time (> 1: onnxruntime faster)"}
    with tempfile.TemporaryDirectory() as tmp:
        plain, folded = Path(tmp) / "teacher.onnx", Path(tmp) / "teacher_cfg.onnx"
        export_onnx(den, plain)
        export_onnx(CFGDenoiser(den, cfg, null=10), folded)
        on_cpu = ["CPUExecutionProvider"]
        result["cpu"] = [
            _cpu_case("cond", den, OnnxDenoiser(plain, providers=on_cpu, threads=threads), batch, steps, repeats,
                      None),
            _cpu_case(f"cfg {cfg:g} folded", den, OnnxDenoiser(folded, providers=on_cpu, threads=threads), batch,
                      steps, repeats, cfg),
        ] if cpu else []
        if not gpu:
            result["gpu"] = {"skipped": "disabled (--no-gpu)"}
        elif not torch.cuda.is_available():
            result["gpu"] = {"skipped": "torch sees no CUDA device"}
        elif "CUDAExecutionProvider" not in ort.get_available_providers():
            result["gpu"] = {"skipped": "onnxruntime has no CUDAExecutionProvider (pip install 'fewstep[onnx-gpu]')"}
        else:
            path16 = Path(tmp) / "teacher_cfg16.onnx"
            convert_file_to_fp16(folded, path16)
            result["gpu"] = _gpu_case(den, path16, batch, steps, repeats, cfg)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"CPU {c['case']}", c["speedup_per_step"], c["speedup_per_sample"]) for c in result["cpu"]]
    if "speedup_per_step" in result.get("gpu", {}):
        rows.append((f"GPU fp16 ({result['gpu']['device']})", result["gpu"]["speedup_per_step"],
                     result["gpu"]["speedup_per_sample"]))
    fig, ax = plt.subplots(figsize=(6, 3))
    idx = np.arange(len(rows))
    ax.bar(idx - 0.2, [r[1] for r in rows], 0.4, label="per step")
    ax.bar(idx + 0.2, [r[2] for r in rows], 0.4, label="per sample")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.3, color="r", lw=0.8, ls="--", label="goal 1.3x")
    ax.set_xticks(idx, [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("torch / onnxruntime")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=positive_int, default=10)
    p.add_argument("--steps", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=20)
    p.add_argument("--threads", type=positive_int, default=None, help="threads for both (default: torch's)")
    p.add_argument("--cfg", type=finite_float, default=2.0)
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--quick", action="store_true", help="5 repeats")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--plot", action="store_true", help="also write onnx_speed.png")
    a = p.parse_args(argv)
    res = run(batch=a.batch, steps=a.steps, repeats=5 if a.quick else a.repeats, threads=a.threads, cfg=a.cfg,
              gpu=not a.no_gpu)
    path = write_json(res, "onnx_speed.json", a.out)
    if a.plot:
        plot(res, path.with_suffix(".png"))
    for c in res["cpu"]:
        print(f"CPU {c['case']:>14}: per step {c['speedup_per_step']:.2f}x, per sample {c['speedup_per_sample']:.2f}x "
              f"(sample rel. error {c['sample_rel_error']:.1e})")
    gpu = res["gpu"]
    if "skipped" in gpu:
        print(f"GPU: skipped ({gpu['skipped']})")
    else:
        print(f"GPU {gpu['device']} fp16: per step {gpu['speedup_per_step']:.2f}x, per sample "
              f"{gpu['speedup_per_sample']:.2f}x")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
