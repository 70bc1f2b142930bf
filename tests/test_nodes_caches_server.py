"""Cache nodes in a real ComfyUI 0.3.75 server: bad cache settings fail only their prompt, with a clear message,
and the server keeps serving (the cache workflows themselves run in test_nodes_server.py)."""

from __future__ import annotations

import json

import pytest
import test_nodes_server as srv
from comfy_client import with_inputs as _with

pytestmark = [pytest.mark.comfy, pytest.mark.slow]




def test_bad_cache_settings_fail_their_prompt_and_the_server_keeps_serving(comfy_server):
    url, _ = comfy_server
    step = srv._graph("fewstep_digits_step_cache")
    block = srv._graph("fewstep_digits_block_cache")

    # threshold out of range: rejected by validation with the limit, nothing runs
    code, body = srv._post_prompt(url, _with(step, "FewstepStepCache", threshold=1.5))
    assert code == 400 and "Value 1.5 bigger than max of 1.0" in json.dumps(body["node_errors"])

    # a calibrated method without a calibration for this model: names the node that makes one
    entry = srv._run(url, _with(step, "FewstepStepCache", method="teacache"))
    assert entry["status"]["status_str"] == "error"
    msg = srv._error_message(entry)
    assert msg.startswith("FewstepStepCache:") and "FewstepCacheCalibrate" in msg
    assert "no cache calibration for model 'comfy-DigitsDiTConfig'" in msg

    # another model's calibration (the core denoiser's shipped one): core's mismatch message
    entry = srv._run(url, _with(block, "FewstepBlockCache", method="magcache",
                                calibration="digits-dit-teacher--8412926f6471acf2.json"))
    assert entry["status"]["status_str"] == "error"
    assert ("calibration is for model 'digits-dit-teacher' but the cache is applied to 'comfy-DigitsDiTConfig'"
            in srv._error_message(entry))

    # ... and the server still runs the next prompt with a cache
    entry = srv._run(url, _with(step, "FewstepDigitsEmptyLatent", batch_size=2))
    assert entry["status"]["status_str"] == "success", srv._error_message(entry)
    assert len(srv._images(url, entry)) == 2
    log = (comfy_server[1] / "server.log").read_text(errors="replace")
    assert "fewstep step cache (easycache, threshold 0.2, forecast none): 24 model calls" in log


def test_calibration_input_never_reads_outside_the_calibration_folders(comfy_server):
    """The step cache's calibration input names a file in models/fewstep_cache_calibrations (or fewstep's own
    calibration folders); a path elsewhere on the server fails the prompt without showing the file's contents."""
    url, workdir = comfy_server
    step = srv._graph("fewstep_digits_step_cache")
    secret = workdir / "secret-cal.json"
    secret.write_text(json.dumps({"format": "SERVER-SECRET-xyz", "model": "SERVER-SECRET-xyz"}))
    for value in (str(secret), "../../secret-cal.json", "/etc/passwd"):
        entry = srv._run(url, _with(step, "FewstepStepCache", method="teacache", calibration=value))
        assert entry["status"]["status_str"] == "error"
        msg = srv._error_message(entry)
        assert msg.startswith("FewstepStepCache:"), msg
        assert "SERVER-SECRET" not in json.dumps(entry) and "root:" not in json.dumps(entry)
        assert "calibration folders" in msg or "must be 'auto' or the file name of a .json" in msg, msg
    entry = srv._run(url, step)  # the server keeps serving
    assert entry["status"]["status_str"] == "success", srv._error_message(entry)
