"""``OnnxExport``: the student exported to ONNX at the end of a tiny fit (tests/distill_tiny.py), checked against the
torch student with the weights it should hold (EMA, best checkpoint), and the failure path keeps the training
result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import distill_tiny as tiny  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("distill_onnx")


def _probe(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *tiny.SHAPE, generator=g)
    sigma = torch.tensor([8.0, 1.5, 0.3])
    y = torch.tensor([1, 4, 7])
    return x, sigma, y


def _ort(path, x, sigma, y, **kw):
    from fewstep.core.export.runtime import OnnxDenoiser

    den = OnnxDenoiser(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(den(x.numpy(), sigma.numpy(), class_labels=y.numpy(), **kw)), den


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _leftovers(d):
    return [p.name for p in d.iterdir() if ".tmp" in p.name]


def test_ema_student_exported_with_its_recipe(work, tmp_path):
    """consistency student (a guidance adapter folded into the graph): ORT == torch student with the EMA weights."""
    from fewstep.callbacks import OnnxExport, StudentEMA
    from fewstep.callbacks.ema import ema_weights

    module = tiny.build("consistency", work)
    ema = StudentEMA(0.5, warmup=False)
    cb = OnnxExport(tmp_path / "student.onnx")
    tiny.trainer(module, 4, callbacks=[ema, cb]).fit(module)
    path = tmp_path / "student.onnx"
    assert path.is_file() and cb.error is None and not _leftovers(tmp_path)
    onnx.checker.check_model(str(path), full_check=True)

    x, sigma, y = _probe()
    w = module.eval_guidance
    out, den = _ort(path, x, sigma, y)  # the exported default guidance scale is the one the student samples with
    with torch.no_grad():
        raw = module.student(x, sigma, class_labels=y, guidance_scale=w)
        with ema_weights(module.trainer, module):
            ref = module.student(x, sigma, class_labels=y, guidance_scale=w)
    assert _rel(raw, ref) > 1e-3, "EMA and raw weights should differ for this test to mean anything"
    err = _rel(out, ref)
    assert err < 1e-4, f"ORT vs torch EMA student: relative error {err:.2e}"
    assert _rel(out, raw) > 1e-3
    with torch.no_grad():  # the live weights were restored after the export
        torch.testing.assert_close(module.student(x, sigma, class_labels=y, guidance_scale=w), raw)
    # another guidance scale goes through the folded adapter too
    out2, _ = _ort(path, x, sigma, y, guidance_scale=2.5)
    with torch.no_grad(), ema_weights(module.trainer, module):
        ref2 = module.student(x, sigma, class_labels=y, guidance_scale=2.5)
    assert _rel(out2, ref2) < 1e-4

    meta = den.meta
    plan = module.sampling_plan()
    assert meta["sampler"]["name"] == plan["sampler"] == "euler"
    np.testing.assert_allclose(meta["sampler"]["sigmas"], plan["sigmas"].tolist(), rtol=1e-6)
    assert meta["sampler"]["schedule"] == "custom"
    assert meta["model_sampling"] == module.model_sampling.config()
    assert meta["guidance"]["default"] == pytest.approx(w) and meta["guidance"]["mode"] == "embedded"
    assert meta["conditions"]["class_labels"]["num_classes"] == 10
    assert meta["precision"] == "fp32" and meta["name"].endswith("-consistency")
    print(f"\nEMA consistency student: ORT vs torch relative error {err:.2e} (w={w}), {_rel(out2, ref2):.2e} (w=2.5)")


class NegStep(Callback):
    """Logs ``-global_step`` so that a ``mode="max"`` checkpoint's best is the first step, deterministically."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.log("neg_step", -float(trainer.global_step), on_step=True, on_epoch=False, batch_size=1)


def test_best_checkpoint_and_fp16(work, tmp_path):
    """weights="best" loads the best checkpoint's student (here: after batch 1), not the final weights."""
    from fewstep.callbacks import OnnxExport

    module = tiny.build("dmd2", work, gan_weight=0.0, gan_critic_weight=0.0, divergence="reverse_kl")
    ck = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="neg_step", mode="max", save_top_k=1,
                         every_n_train_steps=1)
    best = OnnxExport(tmp_path / "best.onnx", weights="best", checkpoint=ck)
    half = OnnxExport(tmp_path / "last16.onnx", weights="last", fp16=True)
    tiny.trainer(module, 4, callbacks=[NegStep(), ck, best, half], enable_checkpointing=True).fit(module)
    ckpt = torch.load(ck.best_model_path, weights_only=False)
    assert ckpt["fewstep"]["counters"]["batches_seen"] == 1 < module.batches_seen

    x, sigma, y = _probe(1)
    with torch.no_grad():
        live = module.student(x, sigma, class_labels=y)
        snap = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(ckpt["state_dict"], strict=False)
        ref = module.student(x, sigma, class_labels=y)
        module.load_state_dict(snap)
    out, den = _ort(tmp_path / "best.onnx", x, sigma, y)
    err = _rel(out, ref)
    assert err < 1e-4, f"ORT vs best-checkpoint student: {err:.2e}"
    assert _rel(out, live) > 1e-3 and _rel(ref, live) > 1e-3
    assert den.meta["sampler"]["name"] == "onestep"
    with torch.no_grad():  # the final weights were restored after loading the best checkpoint
        torch.testing.assert_close(module.student(x, sigma, class_labels=y), live)
    # the fp16 export of the final weights
    out16, den16 = _ort(tmp_path / "last16.onnx", x, sigma, y)
    err16 = _rel(out16, live)
    assert den16.meta["precision"] == "fp16" and err16 < 2e-2, err16
    print(f"\nbest checkpoint: ORT vs torch {err:.2e}; fp16 last weights: {err16:.2e}")


def test_config_errors_fail_before_training(work, tmp_path):
    from fewstep.callbacks import OnnxExport

    module = tiny.build("consistency", work)
    with pytest.raises(ValueError, match="needs a StudentEMA"):
        tiny.trainer(module, 2, callbacks=[OnnxExport(tmp_path / "s.onnx")]).fit(module)
    with pytest.raises(ValueError, match="ModelCheckpoint with a monitor"):
        tiny.trainer(module, 2, callbacks=[OnnxExport(tmp_path / "s.onnx", weights="best")]).fit(module)
    assert module.batches_seen == 0
    with pytest.raises(ValueError, match="weights must be one of"):
        OnnxExport(tmp_path / "s.onnx", weights="newest")
    with pytest.raises(ValueError, match="must end in .onnx"):
        OnnxExport(tmp_path / "s.pt")


def _break_checker(monkeypatch):
    """Make the export fail after the graph is written (the check of the saved file)."""
    def broken(*a, **k):
        raise onnx.checker.ValidationError("simulated failure while checking the saved file")

    monkeypatch.setattr(onnx.checker, "check_model", broken)


def test_failed_export_raises_after_the_checkpoint_and_leaves_no_half_file(work, tmp_path, monkeypatch):
    from fewstep.callbacks import OnnxExport, OnnxExportError, StudentEMA

    module = tiny.build("dmd2", work, gan_weight=0.0, gan_critic_weight=0.0, divergence="reverse_kl")
    ck = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    target = tmp_path / "student.onnx"
    target.write_bytes(b"an earlier export")  # must survive a failed export unchanged
    _break_checker(monkeypatch)
    cb = OnnxExport(target)
    with pytest.raises(OnnxExportError, match="simulated failure") as info:
        tiny.trainer(module, 4, callbacks=[StudentEMA(0.5), ck, cb], enable_checkpointing=True).fit(module)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert str(last) in str(info.value) and last.is_file()
    assert torch.load(last, weights_only=False)["fewstep"]["counters"]["batches_seen"] == 4
    assert target.read_bytes() == b"an earlier export" and not _leftovers(tmp_path)
    assert cb.saved[0] == last and all(p.is_file() for p in cb.saved)


def test_failed_export_warns_and_saves_the_student_without_a_checkpoint(work, tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file

    from fewstep.callbacks import OnnxExport, StudentEMA
    from fewstep.callbacks.ema import ema_weights
    from fewstep.core.models.embedded import build_dit, dit_denoiser

    module = tiny.build("dmd2", work, gan_weight=0.0, gan_critic_weight=0.0, divergence="reverse_kl")
    _break_checker(monkeypatch)
    cb = OnnxExport(tmp_path / "student.onnx", on_error="warn")
    tiny.trainer(module, 4, callbacks=[StudentEMA(0.5), cb]).fit(module)  # returns normally
    assert cb.error is not None and "simulated failure" in caplog.text and "training result is saved" in caplog.text
    assert not (tmp_path / "student.onnx").exists() and not _leftovers(tmp_path)
    saved = tmp_path / "student.safetensors"
    assert cb.saved == [saved] and json.loads(saved.with_suffix(".json").read_text())["method"] == "dmd2"
    net = build_dit(tiny.TINY)
    net.load_state_dict(load_file(str(saved)))
    x, sigma, y = _probe(2)
    with torch.no_grad(), ema_weights(module.trainer, module):  # the EMA weights were saved
        torch.testing.assert_close(dit_denoiser(net.eval())(x, sigma, class_labels=y),
                                   module.student(x, sigma, class_labels=y), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_train_student_onnx_flag_exports_what_it_ships(tmp_path):
    """``fewstep train-student consistency --onnx`` (smoke): every exported student has an ONNX twin that carries
    its sigmas and computes what the shipped safetensors compute (loaded back with ``load_student``)."""
    from fewstep.callbacks.train_students import train_student
    from fewstep.core.models.students import load_student

    s = train_student("consistency", out=tmp_path, smoke=True, max_batches=2, threads=1, progress=False,
                      onnx=True, trajectories=64, batch_size=8)
    files = [f for st in s["stages"] for f in st["files"]]
    onnx_files = [f for f in files if f.endswith(".onnx")]
    assert len(onnx_files) == 2  # the 4-step and the 2-step students
    for f in onnx_files:
        core, meta = load_student(f.replace(".onnx", ".safetensors"))
        x, sigma, y = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)), \
            torch.tensor([80.0, 3.0, 0.5]), torch.tensor([0, 5, 9])
        out, den = _ort(f, x, sigma, y)
        with torch.no_grad():
            ref = core(x, sigma, class_labels=y)
        assert _rel(out, ref) < 1e-4
        np.testing.assert_allclose(den.meta["sampler"]["sigmas"], meta["sigmas"], rtol=1e-6)
