"""The in-ComfyUI benchmark (benchmarks/comfyui.py) on a tiny sample count: it runs through real ComfyUI nodes,
counts NFE correctly (CFG doubles it, cfg 1 does not, caches lower it) and pairs caches at matched speed-ups."""

from __future__ import annotations

import json

import comfy_versions
import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_matched_pairs_nearest_speedup():
    from fewstep.benchmarks.comfyui import matched

    rows = [{"group": "comfyui EasyCache", "speedup": 2.0, "fd": 1.0},
            {"group": "fewstep step", "speedup": 1.5, "fd": 0.5},
            {"group": "fewstep step", "speedup": 2.2, "fd": 0.6},
            {"group": "baseline", "speedup": 1.0, "fd": 0.4}]
    (pair,) = matched(rows)
    assert pair["speedup"] == 2.0 and pair["fewstep step"]["speedup"] == 2.2 and "baseline" not in pair


def test_comfyui_benchmark_samplers_part(comfy_root, tmp_path):
    from fewstep.benchmarks import comfyui
    assert comfyui.main(["--part", "samplers", "--per-class", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "comfyui.json").read_text())
    assert result["comfyui_version"] == comfy_versions.host().version  # the ComfyUI of this test process
    nfe = {r["setting"]: r["nfe"] for r in result["rows"]}
    assert nfe[comfyui.BASELINE] == 100  # 50 steps, cond + uncond
    assert nfe["comfyui dpmpp_2m karras 2 steps cfg 1.25 (teacher)"] == 4
    assert nfe["comfyui euler 1 step cfg 1 (teacher)"] == 1  # ComfyUI skips the uncond pass at cfg 1
    assert nfe["fewstep flow_map, consistency student 4 steps"] == 4
    assert nfe["fewstep onestep, dmd2 student"] == 1
    rows = {r["setting"]: r for r in result["rows"]}
    # ComfyUI's lcm and fewstep's LCM node are the same algorithm with the host's noise: same samples, same metrics,
    # on every supported ComfyUI version
    assert rows["fewstep lcm, consistency student 4 steps"]["fd"] == pytest.approx(
        rows["comfyui lcm, consistency student 4 steps"]["fd"], rel=1e-3)
    assert all(r["speedup"] > 0 and r["accuracy"] >= 0 for r in result["rows"])
    assert (tmp_path / "comfyui.png").stat().st_size > 0
