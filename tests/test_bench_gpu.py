"""``fewstep bench gpu``: a clear message without a GPU; ``--cpu-smoke`` runs every part it can tiny on the CPU and
writes one JSON that ``validate`` accepts; the time budget skips later parts and says so."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fewstep.benchmarks import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the command would run")
def test_no_gpu_is_a_clear_message_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "bench", "gpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no CUDA device" in r.stderr and "--cpu-smoke" in r.stderr
    assert not list(tmp_path.iterdir())


def test_cpu_smoke_writes_one_valid_json(tmp_path, capsys):
    rc = gpu.main(["--cpu-smoke", "--parts", "triton,sparse_attention,sampling", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().out[-3000:]
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == ["gpu_cpu_smoke.json"]
    res = json.loads(files[0].read_text())
    gpu.validate(res)
    assert res["device"] == "cpu" and res["smoke"] is True and res["benchmark"] == "gpu"
    parts = res["parts"]
    assert parts["triton"]["status"] == "skipped" and "CUDA" in parts["triton"]["reason"]
    sparse = parts["sparse_attention"]
    assert sparse["status"] == "ok"
    assert {r["path"] for r in sparse["rows"]} == {"dense_sdpa", "flex_eager", "masked_sdpa"}
    assert all(r["max_abs_err"] < 1e-4 for r in sparse["rows"] if r["path"] != "dense_sdpa")
    sampling = parts["sampling"]
    assert sampling["status"] == "ok" and sampling["rows"][0]["speedup"] == 1.0
    names = [r["setting"] for r in sampling["rows"]]
    assert any(n.startswith("student dmd2") for n in names) and any(n.startswith("student consistency") for n in names)
    for r in sampling["rows"]:
        assert len(r["ms_repeats"]) == sampling["repeats"] and r["ms_per_batch"] > 0
        assert r["nfe_ratio"] == pytest.approx(sampling["rows"][0]["nfe"] / r["nfe"], rel=1e-3)


@pytest.mark.slow
def test_cpu_smoke_onnx_part(tmp_path):
    pytest.importorskip("onnxruntime")
    res = gpu.run(smoke=True, parts=("onnx",))
    part = res["parts"]["onnx"]
    assert part["status"] == "ok", part
    assert len(part["cpu"]) == 2 and all(c["sample_rel_error"] < 1e-3 for c in part["cpu"])
    assert "skipped" in part["gpu"]


def test_budget_skips_later_parts_and_says_so():
    res = gpu.run(smoke=True, parts=("triton", "sampling"), budget_s=0.0)
    gpu.validate(res)
    assert all(p["status"] == "skipped" and "budget" in p["reason"] for p in res["parts"].values())


def test_validate_names_what_is_wrong():
    good = gpu.run(smoke=True, parts=("triton",))
    gpu.validate(good)
    with pytest.raises(ValueError, match="'device' must be a str"):
        gpu.validate({**good, "device": None})
    with pytest.raises(ValueError, match="status must be one of"):
        gpu.validate({**good, "parts": {"triton": {"status": "maybe", "seconds": 1.0}}})
    with pytest.raises(ValueError, match="without a reason"):
        gpu.validate({**good, "parts": {"triton": {"status": "failed", "seconds": 1.0}}})
    with pytest.raises(ValueError, match="unknown parts"):
        gpu.validate({**good, "parts": {"warp": {"status": "ok", "seconds": 1.0}}})
