"""Core additions behind the guidance-adapter node (no ComfyUI needed): ``GuidanceAdapter.load(match="weights")``
recognises the base model by its weights whatever class holds them (the ComfyUI port of the digits DiT has the
diffusers parameter names), refuses other weights; ``adapter_metadata`` rejects files that are not adapters."""

from __future__ import annotations

import pytest
import torch

from fewstep.core.guidance.adapters import GuidanceAdapter, adapter_metadata, base_weights_hash
from fewstep.core.models.embedded import TEACHER_CONFIG, WEIGHTS_DIR, load_teacher
from fewstep.nodes.digits_dit import DigitsDiTNet

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = WEIGHTS_DIR / "digits_agd_adapter.safetensors"


@pytest.fixture(scope="module")
def teacher():
    return load_teacher()


def test_match_weights_accepts_a_port_with_the_same_weights(teacher):
    port = DigitsDiTNet(TEACHER_CONFIG).eval()
    port.load_state_dict(teacher.model.state_dict())
    with pytest.raises(ValueError, match="config hash"):  # another class: the config check refuses it
        GuidanceAdapter.load(ADAPTER, port)
    adapter = GuidanceAdapter.load(ADAPTER, port, match="weights")
    reference = GuidanceAdapter.load(ADAPTER, teacher.model)
    assert adapter.target_names == reference.target_names
    for a, b in zip(adapter.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    assert adapter.base is port and reference.base is teacher.model  # hooks go on the port (forward parity with
    # the core AdaptedDenoiser runs through ComfyUI in test_nodes_guidance.py)


def test_match_weights_refuses_other_weights(teacher):
    other = DigitsDiTNet(TEACHER_CONFIG)  # random init, same architecture
    with pytest.raises(ValueError) as err:
        GuidanceAdapter.load(ADAPTER, other, match="weights", base_label="my random DiT")
    msg = str(err.value)
    assert "trained for base model 'digits-dit-teacher'" in msg and "my random DiT" in msg
    assert base_weights_hash(other) in msg and adapter_metadata(ADAPTER)["base_weights_hash"] in msg
    with pytest.raises(ValueError, match="match must be 'config' or 'weights'"):
        GuidanceAdapter.load(ADAPTER, teacher.model, match="names")


def test_adapter_metadata_rejects_non_adapters(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="guidance adapter not found"):
        adapter_metadata(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors is not a fewstep guidance adapter"):
        adapter_metadata(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match=r"lora.safetensors is not a fewstep guidance adapter \(format None\)"):
        adapter_metadata(tmp_path / "lora.safetensors")
