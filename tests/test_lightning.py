"""Lightning distillation modules and callbacks on tiny random DiTs, on CPU with a stock lightning.Trainer."""

import json

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("peft")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

torch.set_num_threads(1)




import distill_tiny as tiny  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("distill")


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        out = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(out))


@pytest.mark.parametrize("method", tiny.METHODS)
def test_module_trains_and_loss_goes_down(method, work):
    """Each module runs with a stock Trainer and its loss falls on a tiny overfitting problem (8 samples)."""
    from fewstep.callbacks import DivergenceGuard, StudentEMA

    module = tiny.build(method, work, unique_samples=8)
    rec = Losses()
    ema = StudentEMA(0.9)
    tiny.trainer(module, 40, callbacks=[ema, DivergenceGuard(), rec]).fit(module)
    assert module.batches_seen == 40
    first, last = sum(rec.values[:6]) / 6, sum(rec.values[-6:]) / 6
    assert last < 0.8 * first, (method, rec.values)
    # the EMA follows the student and is swapped in and out
    params = module.ema_parameters()
    live = {k: p.detach().clone() for k, p in params.items()}
    assert any(not torch.equal(ema.ema[k], live[k]) for k in live)
    with ema.swapped(module):
        assert all(torch.equal(p, ema.ema[k]) for k, p in params.items())
    assert all(torch.equal(p, live[k]) for k, p in params.items())
    if method == "dmd2":
        assert module.generator_updates == 20 and module.critic_updates == 40


@pytest.mark.parametrize("method,over", [("dmd2", {"student": "lora", "lora_rank": 4}), ("consistency", {})])
def test_resume_reproduces_an_uninterrupted_run(method, over, work, tmp_path):
    """Stop after 3 batches, resume from the checkpoint to 6: weights, EMA and counters equal an uninterrupted run."""
    from fewstep.callbacks import StudentEMA

    def run(batches, ckpt=None, save=None):
        module = tiny.build(method, work, **over)
        ema = StudentEMA(0.8)
        t = tiny.trainer(module, batches, callbacks=[ema])
        t.fit(module, ckpt_path=ckpt)
        if save:
            t.save_checkpoint(save)
        return module, ema

    full, ema_full = run(6)
    run(3, save=tmp_path / "mid.ckpt")
    ck = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    # the frozen teacher is not saved (a LoRA student's matrices sit in the shared network, seen from both)
    assert all("lora_" in k for k in ck["state_dict"] if k.startswith("teacher."))
    assert ck["fewstep"]["counters"]["batches_seen"] == 3
    resumed, ema_res = run(6, ckpt=tmp_path / "mid.ckpt")
    assert resumed.counters() == full.counters()
    a, b = tiny.trained_state(full), tiny.trained_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for k in ema_full.ema:
        assert torch.equal(ema_full.ema[k], ema_res.ema[k]), k
    if method == "consistency":
        assert all(torch.equal(full._target[k], resumed._target[k]) for k in full._target)


def test_bad_input_errors_before_training(work):
    from fewstep.callbacks import ConsistencyDistillation, DMD2Distillation

    teacher = tiny.tiny_teacher()

    class Cropper(torch.nn.Module):
        model_sampling = teacher.model_sampling

        def forward(self, x, sigma, **cond):
            return x[..., :4, :4]

    with pytest.raises(ValueError, match="output shapes differ"):
        DMD2Distillation(teacher, tiny.SHAPE, student=Cropper())
    no_null = tiny.tiny_teacher()
    emb = no_null.model.transformer_blocks[0].norm1.emb.class_embedder
    emb.embedding_table = torch.nn.Embedding(10, emb.embedding_table.embedding_dim)
    with pytest.raises(ValueError, match="no null class"):
        DMD2Distillation(no_null, tiny.SHAPE, guidance_scale=2.0)
    DMD2Distillation(no_null, tiny.SHAPE, guidance_scale=1.0)  # no CFG: fine
    with pytest.raises(ValueError, match="rank 64 is larger than layer"):
        DMD2Distillation(tiny.tiny_teacher(), tiny.SHAPE, student="lora", lora_rank=64)
    x, y = tiny.real_data()
    with pytest.raises(ValueError, match="empty"):
        ConsistencyDistillation(teacher, tiny.SHAPE, x, real_labels=y, guidance=(3.0, 1.0))
    with pytest.raises(ValueError, match="f-divergence|density ratio"):
        DMD2Distillation(teacher, tiny.SHAPE, divergence="forward_kl")


def test_lora_export_merged_and_comfy_lora(work, tmp_path):
    from fewstep.callbacks import StudentEMA, StudentExport
    from fewstep.core.models.embedded import build_dit, dit_denoiser

    module = tiny.build("dmd2", work, student="lora", lora_rank=4, gan_weight=0.0, gan_critic_weight=0.0,
                        divergence="reverse_kl")
    export = StudentExport(tmp_path / "student.safetensors", dare_p=0.5)
    tiny.trainer(module, 4, callbacks=[StudentEMA(0.5), export]).fit(module)
    names = {p.name for p in export.written}
    assert names == {"student.safetensors", "student_lora.safetensors"}
    meta = json.loads((tmp_path / "student.json").read_text())
    assert meta["method"] == "dmd2" and meta["sampler"] == "onestep" and meta["student"] == "lora"
    # the merged weights load into a plain DiT and reproduce the student's EMA output
    net = build_dit(tiny.TINY)
    net.load_state_dict(load_file(str(tmp_path / "student.safetensors")))
    plain = dit_denoiser(net.eval())
    x, s, y = torch.randn(2, *tiny.SHAPE), torch.tensor([5.0, 1.0]), torch.tensor([1, 2])
    with export_ema(module, export):
        torch.testing.assert_close(plain(x, s, class_labels=y), module.student(x, s, class_labels=y),
                                   atol=1e-5, rtol=1e-4)
    lora = load_file(str(tmp_path / "student_lora.safetensors"))
    ups = [k for k in lora if k.endswith(".lora_up.weight")]
    assert ups and all(k.startswith("diffusion_model.transformer_blocks.0.") for k in lora)
    assert all(lora[k].shape[1] <= 4 for k in ups)  # DARE dropped rank components


def export_ema(module, export):
    from fewstep.callbacks.ema import ema_weights

    return ema_weights(module.trainer, module)


def test_divergence_guard_stops_and_keeps_the_last_good_checkpoint(work, tmp_path):
    from fewstep.callbacks import DivergenceError, DivergenceGuard

    module = tiny.build("reflow", work)
    original = module.reflow_step

    def poisoned(ids):
        loss, logs = original(ids)
        return (loss * float("nan") if module.batches_seen >= 5 else loss), logs

    module.reflow_step = poisoned
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True, save_top_k=-1)
    t = tiny.trainer(module, 10, callbacks=[DivergenceGuard(), ckpt], enable_checkpointing=True)
    with pytest.raises(DivergenceError, match="diverged in batch 6.*last good checkpoint"):
        t.fit(module)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["fewstep"]["counters"]["batches_seen"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_sample_grid_and_quality_eval(work, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from fewstep.callbacks import QualityEval, SampleGrid

    teacher = tiny.tiny_teacher(sample_size=16)
    from fewstep.callbacks import ReflowDistillation
    from fewstep.core.trajectories import generate_trajectories

    traj = generate_trajectories(teacher, tmp_path / "traj16", num_samples=8, sample_shape=(1, 16, 16), steps=2,
                                 progress=False)
    module = ReflowDistillation(teacher, (1, 16, 16), traj, batch_size=4)
    grid = SampleGrid(tmp_path / "grids", every_n_steps=2, per_class=2)
    quality = QualityEval(every_n_steps=None, per_class=1)
    tiny.trainer(module, 2, callbacks=[grid, quality], logger=CSVLogger(tmp_path / "logs")).fit(module)
    assert [p.name for p in grid.written] == ["samples_000002.png"]
    from PIL import Image

    assert Image.open(grid.written[0]).size == (2 * 17 * 4 + 4, 10 * 17 * 4 + 4)
    row = quality.history[-1]
    assert row["batches"] == 2 and 0.0 <= row["accuracy"] <= 1.0 and row["fd"] >= 0.0
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "eval/fd" in metrics


def test_dmd2_multistep_trains_on_its_own_backward_simulation(work):
    """DMD2 sec. 4.4: a multi-step generator is trained at each of its timesteps on the state its own sampling
    (x0 prediction, re-noised) reaches there."""
    from fewstep.core.distill import randint_per_sample

    module = tiny.build("dmd2", work, generator_timesteps=[999, 499], gan_weight=0.0, gan_critic_weight=0.0,
                        divergence="reverse_kl")
    ms, gs = module.model_sampling, module.generator_sigmas
    ids = torch.arange(16)
    labels = module.draw_labels(ids)
    x, sig = module.generator_inputs(ids, labels)
    k = randint_per_sample(ids, 2, "dmd/gen_step", module.seed)
    assert set(k.tolist()) == {0, 1}
    z = module.randn(ids, "dmd/gen_noise")
    x_top = ms.noise_scaling(gs[0], z, torch.zeros_like(z), max_denoise=True)
    with torch.no_grad():
        x0 = module.student(x_top, gs[0].expand(16), class_labels=labels)
    x_mid = ms.noise_scaling(gs[1], module.randn(ids, "dmd/sim_noise1"), x0)
    first = k == 0
    torch.testing.assert_close(x[first], x_top[first])
    torch.testing.assert_close(x[~first], x_mid[~first])
    torch.testing.assert_close(sig, torch.where(first, gs[0], gs[1]))
    plan = module.sampling_plan()
    assert plan["sampler"] == "dmd" and torch.equal(plan["sigmas"], torch.tensor([float(gs[0]), float(gs[1]), 0.0]))
    tiny.trainer(module, 2).fit(module)
    assert module.generate_samples(labels[:4]).shape == (4, *tiny.SHAPE)


def test_endless_batches_need_a_stop_and_max_time_is_one(work):
    """Modules draw endless batches: a Trainer without max_steps/max_time is refused, max_time alone works."""
    module = tiny.build("reflow", work, unique_samples=8)
    with pytest.raises(ValueError, match="max_steps"):
        tiny.trainer(module, 1, max_steps=-1).fit(module)
    module = tiny.build("reflow", work, unique_samples=8)
    tiny.trainer(module, 1, max_steps=-1, max_time={"seconds": 2}).fit(module)
    assert module.batches_seen >= 1


def test_reflow_loss_and_time_options(work):
    """``loss="huber"`` computes ``reflow_huber_loss`` on the same batch (with ``huber_c``), ``time_sampling="top"``
    draws ``top_time`` times in ``[t_min, t_max]``; bad values are refused with the allowed choices."""
    from fewstep.core.distill import rand_per_sample, randint_per_sample
    from fewstep.core.losses import reflow_huber_loss, reflow_loss, top_time

    ids = torch.arange(8)
    l2 = tiny.build("reflow", work)
    hub = tiny.build("reflow", work, loss="huber", huber_c=0.05)
    hub.student.load_state_dict(l2.student.state_dict())
    captured = {}
    for name, m in (("l2", l2), ("huber", hub)):
        original = m.student.forward

        def spy(x, sigma, *a, _n=name, _f=original, **k):
            out = _f(x, sigma, *a, **k)
            captured[_n] = out.detach()
            return out

        m.student.forward = spy
        with torch.no_grad():
            captured[name + "_loss"] = float(m.reflow_step(ids)[0])
    torch.testing.assert_close(captured["l2"], captured["huber"])  # same pairs, same times, same student
    idx = randint_per_sample(ids, len(l2.endpoint), "rf/index", 0)
    t = l2.sample_time(ids)
    assert captured["huber_loss"] == pytest.approx(float(reflow_huber_loss(captured["l2"], l2.endpoint[idx], t, 0.05)),
                                                   rel=1e-5)
    assert captured["l2_loss"] == pytest.approx(float(reflow_loss(captured["l2"], l2.endpoint[idx], t)), rel=1e-5)
    assert captured["huber_loss"] != pytest.approx(captured["l2_loss"], rel=1e-3)
    top = tiny.build("reflow", work, time_sampling="top", u_a=6.0)
    u = rand_per_sample(ids, 1, "rf/t", top.seed, top.device)[:, 0]
    torch.testing.assert_close(top.sample_time(ids), top.t_min + (top.t_max - top.t_min) * top_time(u, 6.0))
    with pytest.raises(ValueError, match="loss must be one of"):
        tiny.build("reflow", work, loss="lpips")
    with pytest.raises(ValueError, match="huber_c must be > 0"):
        tiny.build("reflow", work, loss="huber", huber_c=0.0)
    with pytest.raises(ValueError, match="time_sampling must be one of"):
        tiny.build("reflow", work, time_sampling="late")
