"""DMD2 distillation as a LightningModule (manual optimization: generator and critic).

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis", Alg. 1: per batch the
generator (the student) is updated once every ``critic_ratio`` batches with the distribution-matching gradient
(``core.losses.dmd_loss``: teacher with CFG as the real score, critic as the fake score, at re-noised generator
samples), and the critic is updated on every batch with the denoising loss on detached generator samples
(``fake_score_loss``). Optional GAN classifier on the critic's features (sec. 4.3) trained on real data, and
optional f-divergence weighting from its logit (f-distill). Multi-step generators (sec. 4.4) are trained at
their timesteps on states made by their own backward simulation. Optional DMD regression loss (DMD eq. 9) on
teacher ODE pairs, and a linear learning-rate warm-up of both optimizers.

Recipe notes (measured on the embedded digits teacher, see ``callbacks.train_students.dmd2_recipe``): a one-step
generator fed pure noise labelled ``t = 999`` starts as the teacher at ``sigma_max``, which returns nearly the class
mean for every noise; the distribution-matching gradient then has to create all diversity from scratch and a short
run collapses (one image per class). Label the input with a lower timestep (``generator_timesteps=[399]``, as
DMD2's one-step SDXL) or start from a student that already maps noise to images (reflow, or the regression loss).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.conditioning import cond_cat, cond_index, cond_len, cond_to, real_conditions
from ..core.distill import check_guidance_range, rand_per_sample, randint_per_sample
from ..core.guidance.scaled import guided_denoise
from ..core.losses.common import fraction_at_sigma, sigma_at_fraction, signal_noise
from ..core.losses.dmd import (
    DIVERGENCES,
    decoupled_dmd_loss,
    dmd_gradient,
    dmd_loss,
    f_divergence_weights,
    fake_score_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    regression_loss,
    subinterval_denoising_target,
    subinterval_transition,
)
from ..core.models.critic import HEADS, FeatureTap, default_feature_module
from ..core.sampling.model_sampling import broadcast_sigma
from ..core.sampling.schedules import timestep_list
from .base import DistillationModule, frozen
from .sharding import reshard


def dmd2_optimizer_steps(batches: int, critic_ratio: int, critic_warmup: int = 0) -> int:
    """``trainer.global_step`` after ``batches`` DMD2 batches: one critic step per batch plus one generator step
    every ``critic_ratio`` batches after the ``critic_warmup`` critic-only ones (Lightning counts every optimizer
    step under manual optimization)."""
    gen = max(0, batches - critic_warmup)
    return batches + (gen + critic_ratio - 1) // critic_ratio


class DMD2Distillation(DistillationModule):
    """One- or multi-step DMD2 student of a teacher.

    Args (besides ``DistillationModule``'s):
        guidance_scale: CFG scale of the real score (fewstep convention; 1 = no CFG).
        generator_timesteps: ``None`` for a one-step generator at ``sigma_max``; or model timesteps such as
            ``[999, 749, 499, 249]`` for a multi-step generator (backward simulation).
        critic_ratio: critic updates per generator update (DMD2 uses 5; counted by ``batches_seen``).
        critic_lr: critic learning rate (default ``lr``).
        head_lr: learning rate of the GAN head (default ``critic_lr``; a freshly initialised head learns nothing
            in a few hundred updates at a fine-tuning rate).
        t_range: re-noising levels of the distribution-matching term as fractions of the noise range (DMD2:
            ``[0.02, 0.98]`` of the timesteps).
        critic_t_range: noise levels of the critic's denoising loss (DMD2 trains the fake score on every timestep:
            ``[0, 1]``).
        gan_t_range: noise levels at which the GAN head sees real and generated samples (DMD2's diffusion GAN:
            ``[0, 1]``; low levels make the discriminator's job, and its gradient, about the clean image).
        head: GAN head on the critic's features: ``"spatial"`` (convolutions on the token grid, as DMD2) or
            ``"pooled"`` (mean-pooled tokens, the earlier default).
        critic_loss_space: ``"native"`` (the teacher's eps/v parameterisation) or ``"x0"``.
        gan_weight, gan_critic_weight: GAN generator / discriminator loss weights (0 = no GAN head).
        divergence: ``"reverse_kl"`` (DMD), ``"forward_kl"`` or ``"js"`` (f-distill; needs the GAN head).
        real_data, real_labels: real samples (and their classes) for the GAN discriminator.
        feature_module: critic layer whose output feeds the GAN head (default: middle block).
        max_generator_steps: stop training after this many generator updates.
        regression_weight: weight of DMD's regression loss on ``regression_pairs`` (0 = off).
        regression_pairs: teacher ODE pairs: a trajectory folder (``core.trajectories``) or a dict with ``noise``
            (the unit-variance noise the teacher started from), ``endpoint`` (its sample) and ``cond`` (class).
        warmup_steps: linear learning-rate warm-up over this many updates of each optimizer (DMD2: 500).
        ca_weight, dm_weight: Decoupled DMD (``core.losses.dmd.decoupled_dmd_gradient``): weights of the
            CFG-augmentation and distribution-matching parts of the direction (1, 1 = plain DMD with CFG).
        phased: Phased DMD (Fan et al. 2025, sec. 3) for multi-step generators: step ``k`` of the generator (input
            level ``sigma_k``) is matched as the distribution of its re-noised output ``x_s`` at the next level
            ``s = sigma_{k+1}`` (0 after the last step), on levels inside its own subinterval ``(s, sigma_k]``
            only (``t_range`` / ``critic_t_range`` are mapped onto the subinterval); the critic there learns by
            score matching within the subinterval (``core.losses.dmd.subinterval_denoising_target``). Early steps
            are then only asked for the coarse, noisy distribution they hand on, which keeps diversity. The phases
            are trained together (backward simulation picks one per sample), with one network.
        critic_warmup: batches of critic-only updates before the first generator update (0 = none). The fake
            score starts as a copy of the teacher, so until it has learnt the generator's distribution the
            distribution-matching direction ``fake - real`` is the teacher's CFG difference, not a measure of
            the generator; this lets it learn first. The generator is then updated on batches
            ``critic_warmup, critic_warmup + critic_ratio, ...`` (counted by ``batches_seen``).
    """

    method = "dmd2"

    def __init__(self, teacher: nn.Module, sample_shape: Sequence[int], guidance_scale: float = 2.0,
                 generator_timesteps: Sequence[float] | None = None, critic_ratio: int = 5,
                 critic_lr: float | None = None, head_lr: float | None = None,
                 t_range: tuple[float, float] = (0.02, 0.98),
                 critic_loss_space: str = "native", gan_weight: float = 0.0, gan_critic_weight: float | None = None,
                 divergence: str = "reverse_kl", real_data: Tensor | None = None, real_labels: Tensor | None = None,
                 feature_module: str | None = None, max_generator_steps: int | None = None,
                 critic_t_range: tuple[float, float] | None = (0.0, 1.0), gan_t_range: tuple[float, float] = (0.0, 1.0),
                 head: str = "spatial", regression_weight: float = 0.0, regression_pairs: Any = None,
                 warmup_steps: int = 0, ca_weight: float = 1.0, dm_weight: float = 1.0, phased: bool = False,
                 critic_warmup: int = 0, **kwargs: Any):
        critic = copy.deepcopy(teacher)  # before a LoRA student changes the teacher network
        super().__init__(teacher, sample_shape, **kwargs)
        self.automatic_optimization = False
        self.guidance_scale = check_guidance_range(guidance_scale, "real-score guidance scale")[0]
        self._check_cfg((self.guidance_scale, self.guidance_scale))
        if int(critic_ratio) < 1:
            raise ValueError(f"critic_ratio must be >= 1, got {critic_ratio}")
        self.critic_ratio = int(critic_ratio)
        if int(critic_warmup) < 0:
            raise ValueError(f"critic_warmup must be >= 0 batches, got {critic_warmup}; use 0 for none")
        self.critic_warmup = int(critic_warmup)
        self.critic_lr = float(critic_lr if critic_lr is not None else self.lr)
        self.head_lr = float(head_lr if head_lr is not None else self.critic_lr)
        self.t_range = _check_range(t_range, "t_range")
        self.critic_t_range = _check_range(critic_t_range if critic_t_range is not None else t_range,
                                           "critic_t_range")
        self.gan_t_range = _check_range(gan_t_range, "gan_t_range")
        if head not in HEADS:
            raise ValueError(f"head must be one of {tuple(HEADS)}, got {head!r}")
        self.head_kind = head
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = int(warmup_steps)
        self.ca_weight, self.dm_weight = float(ca_weight), float(dm_weight)
        if self.ca_weight < 0 or self.dm_weight < 0:
            raise ValueError(f"ca_weight and dm_weight must be >= 0, got {ca_weight}, {dm_weight}")
        self.decoupled = (self.ca_weight, self.dm_weight) != (1.0, 1.0)
        if self.decoupled and divergence != "reverse_kl":
            raise ValueError("Decoupled DMD (ca_weight / dm_weight) is defined for the reverse-KL direction; "
                             f"got divergence {divergence!r}")
        self.regression_weight = float(regression_weight)
        if self.regression_weight < 0:
            raise ValueError(f"regression_weight must be >= 0, got {regression_weight}")
        self.regression = None
        if self.regression_weight > 0:
            if regression_pairs is None:
                raise ValueError("regression_weight > 0 needs regression_pairs (a trajectory folder or a dict with "
                                 "noise, endpoint and cond)")
            self.regression = _regression_pairs(regression_pairs, self.sample_shape)
        if critic_loss_space not in ("native", "x0"):
            raise ValueError(f"critic_loss_space must be 'native' or 'x0', got {critic_loss_space!r}")
        self.critic_loss_space = critic_loss_space
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.gan_weight = float(gan_weight)
        self.gan_critic_weight = float(gan_critic_weight if gan_critic_weight is not None else gan_weight)
        self.use_gan = self.gan_weight > 0 or self.gan_critic_weight > 0 or divergence != "reverse_kl"
        if divergence != "reverse_kl" and self.gan_critic_weight <= 0:
            raise ValueError(f"divergence {divergence!r} needs the density ratio of a trained GAN discriminator: "
                             "set gan_critic_weight > 0 (and real_data)")
        self.divergence = divergence
        if self.use_gan and real_data is None:
            raise ValueError("the GAN head (gan_weight / gan_critic_weight / f-divergence) needs real_data")
        self.real_data = None if real_data is None else torch.as_tensor(real_data).float().cpu()
        self.real_labels = None if real_labels is None else real_conditions(real_labels)
        if self.real_data is not None and tuple(self.real_data.shape[1:]) != self.sample_shape:
            raise ValueError(f"real_data samples have shape {tuple(self.real_data.shape[1:])}, "
                             f"expected {self.sample_shape}")
        critic.requires_grad_(True).eval()
        self.critic = critic
        ms = self.model_sampling
        if generator_timesteps is None:
            self.generator_sigmas = torch.tensor([float(ms.sigma_max)])
        else:
            self.generator_sigmas = timestep_list(ms, generator_timesteps)[:-1]
        self.phased = bool(phased)
        if self.phased and self.decoupled:
            raise ValueError("phased=True and Decoupled DMD (ca_weight / dm_weight) cannot be combined yet")
        # noise-range fractions of the generator's levels and 0: the subinterval ends of Phased DMD
        self.phase_fractions = torch.tensor([fraction_at_sigma(ms, float(sg)) for sg in self.generator_sigmas]
                                            + [0.0])
        self._last_generator_sigma: Tensor | None = None
        self.head: nn.Module | None = None
        self.tap: FeatureTap | None = None
        if self.use_gan:
            net = getattr(critic, "model", critic)
            self.tap = FeatureTap(net, feature_module or default_feature_module(net))
            with self.tap.capture():
                from ..core.distill import probe_output

                probe_output(critic, self.sample_shape, self._probe_cond())
            feats = self.tap.features
            self.head = HEADS[head](int(feats.shape[-1] if feats.ndim == 3 else feats.shape[1]))
        self.max_generator_steps = max_generator_steps
        self.generator_updates = 0
        self.critic_updates = 0
        self.save_hyperparameters(ignore=["teacher", "student", "real_data", "real_labels", "regression_pairs",
                                          "cond_pool"],
                                  logger=False)

    # ------------------------------------------------------------------------------------------ state
    def counters(self) -> dict[str, int]:
        return {**super().counters(), "generator_updates": self.generator_updates,
                "critic_updates": self.critic_updates}

    def configure_optimizers(self):
        gen = torch.optim.AdamW(self.student_trainable(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        groups = [{"params": list(self.critic.parameters()), "lr": self.critic_lr}]
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "lr": self.head_lr})
        crit = torch.optim.AdamW(groups, lr=self.critic_lr, betas=self.betas, weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return [gen, crit]
        return [gen, crit], [self.linear_warmup(gen, self.warmup_steps), self.linear_warmup(crit, self.warmup_steps)]

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters()) + (list(self.head.parameters()) if self.head is not None else [])

    # ----------------------------------------------------------------------------------------- pieces
    def _native(self, sigma: Tensor, x0: Tensor, x: Tensor) -> Tensor:
        if self.critic_loss_space == "x0":
            return x0
        return self.model_sampling.output_from_denoised(sigma, x0, x)

    def _renoise_sigma(self, ids: Tensor, stream: str, t_range: tuple[float, float] | None = None) -> Tensor:
        lo, hi = t_range or self.t_range
        u = rand_per_sample(ids, 1, stream, self.seed, self.device)[:, 0]
        return sigma_at_fraction(self.model_sampling, lo + (hi - lo) * u).to(self.device)

    def generator_inputs(self, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, sigma)`` the generator is trained on: pure noise at the first generator sigma, or for multi-step
        generators the state at a random one of its sigmas reached by its own sampling (no gradient)."""
        ms = self.model_sampling
        sig = self.generator_sigmas.to(self.device)
        z = self.randn(ids, "dmd/gen_noise")
        x = ms.noise_scaling(sig[0], z, torch.zeros_like(z), max_denoise=True)
        if len(sig) == 1:
            return x, sig[0].expand(len(ids))
        k = randint_per_sample(ids, len(sig), "dmd/gen_step", self.seed, self.device)
        out, out_sigma = x.clone(), sig[0].expand(len(ids)).clone()
        with torch.no_grad():
            for j in range(1, int(k.max()) + 1):
                x0 = self.student(x, sig[j - 1].expand(len(ids)), **self.cond(labels))
                x = ms.noise_scaling(sig[j], self.randn(ids, f"dmd/sim_noise{j}"), x0)
                pick = k == j
                out[pick], out_sigma = x[pick], torch.where(pick, sig[j], out_sigma)
        return out, out_sigma

    def _critic_forward(self, x: Tensor, sigma: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.tap is None:
            return self.critic(x, sigma, **self.cond(labels)), None
        with self.tap.capture():
            out = self.critic(x, sigma, **self.cond(labels))
        return out, self.head(self.tap.features)

    def generator_loss(self, ids: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """DMD2 generator loss for the samples ``ids``. Returns ``(loss, generated x0 (detached), logs)``."""
        ms = self.model_sampling
        labels = self.draw_labels(ids)
        x_in, sigma_in = self.generator_inputs(ids, labels)
        x0 = self.student(x_in, sigma_in, **self.cond(labels))
        self._last_generator_sigma = sigma_in.detach()
        if self.phased:
            x_t, sigma = self.phase_renoise(ids, x0, sigma_in, "dmd")
        else:
            sigma = self._renoise_sigma(ids, "dmd/t")
            x_t = ms.noise_scaling(sigma, self.randn(ids, "dmd/noise"), x0)
        with torch.no_grad():
            parts = guided_denoise(self.teacher, x_t.detach(), sigma, self.guidance_scale, self.cond_key, self.null,
                                   return_parts=self.decoupled, **self.cond(labels))
        real_x0, cond_x0, uncond_x0 = parts if self.decoupled else (parts, None, None)
        logs: dict[str, Tensor] = {}
        with frozen(self.critic, self.head):
            with torch.no_grad():
                fake_x0, logits = self._critic_forward(x_t.detach(), sigma, labels)
            if self.is_sharded():  # FSDP2 keeps a root unit gathered after a no-grad forward; gathered, its next
                reshard(self.critic)  # (training) forward would skip the gradient reduce-scatter of its parameters
            weights = None
            if self.divergence != "reverse_kl":
                weights = f_divergence_weights(logits, self.divergence, self.batch_mean)
                logs["f_weight_max"] = weights.max()
            if self.decoupled:
                loss = decoupled_dmd_loss(x0, cond_x0, uncond_x0, fake_x0, self.guidance_scale, self.ca_weight,
                                          self.dm_weight)
            else:
                loss = dmd_loss(x0, real_x0, fake_x0.detach(), weights)
            logs["dmd"] = loss.detach()
            logs["dmd_grad"] = dmd_gradient(x0, real_x0, fake_x0, weights).abs().mean()
            if self.gan_weight > 0:
                sigma_g = self._renoise_sigma(ids, "gan/t", self.gan_t_range)
                xg_t = ms.noise_scaling(sigma_g, self.randn(ids, "gan/noise"), x0)
                _, gan_logits = self._critic_forward(xg_t, sigma_g, labels)
                g = gan_generator_loss(gan_logits)
                logs["gan_g"] = g.detach()
                loss = loss + self.gan_weight * g
        if self.regression is not None:
            r = self.regression_term(ids)
            logs["regression"] = r.detach()
            loss = loss + self.regression_weight * r
        return loss, x0.detach(), logs

    def phase_renoise(self, ids: Tensor, x0: Tensor, sigma_in: Tensor, stream: str,
                      with_target: bool = False) -> tuple[Tensor, ...]:
        """Phased DMD: the phase output ``x_s`` (``x0`` re-noised to the level after ``sigma_in``; its noise is the
        same for the generator and the critic step of a sample) carried to a level ``t`` of the subinterval
        ``(s, sigma_in]``. Returns ``(x_t, sigma_t)``; with ``with_target`` also the critic's subinterval target and
        a per-sample loss weight ``1 / (1 + v)`` with ``v = (k^2 s_s^2 / (a_t b))^2`` (``b``: the subinterval kernel's
        noise), the variance per element of the target's own noise: it is 0 where the subinterval starts at clean
        data (weight 1) and large early on (unweighted, the critic loss was ~100 against 0.05 for plain DMD2 on the
        digits). A weight that depends on the levels alone leaves the regression's minimiser, the marginal
        denoiser, unchanged."""
        ms = self.model_sampling
        sig = self.generator_sigmas.to(sigma_in.device)
        k = (sigma_in.reshape(-1, 1) - sig.reshape(1, -1)).abs().argmin(dim=1)
        fr = self.phase_fractions.to(sigma_in.device)
        f_hi, f_lo = fr[k], fr[k + 1]
        lo, hi = self.t_range if stream == "dmd" else (max(self.critic_t_range[0], self.t_range[0]),
                                                        self.critic_t_range[1])
        u = rand_per_sample(ids, 1, f"{stream}/phase_t", self.seed, self.device)[:, 0]
        sigma_t = sigma_at_fraction(ms, f_lo + (f_hi - f_lo) * (lo + (hi - lo) * u)).to(self.device)
        sigma_s = torch.cat([sig, sig.new_zeros(1)])[k + 1]
        x_s = torch.where(broadcast_sigma(sigma_s, x0) > 0,
                          ms.noise_scaling(sigma_s, self.randn(ids, "phase/noise"), x0), x0)
        (a_s, s_s), (a_t, s_t) = signal_noise(ms, sigma_s), signal_noise(ms, sigma_t)
        a_s, s_s, a_t, s_t = (broadcast_sigma(v, x0) for v in (a_s, s_s, a_t, s_t))
        kk, b = subinterval_transition(a_s, s_s, a_t, s_t)
        x_t = kk * x_s + b * self.randn(ids, f"{stream}/phase_noise")
        if not with_target:
            return x_t, sigma_t
        # D* = (k x_s - k^2 s_s^2 n' / b) / a_t given x_s: its noise is k^2 s_s^2 / (a_t b) per element (VE: s_s^2 / b)
        weight = 1.0 / (1.0 + (kk**2 * s_s**2 / (a_t * b)).reshape(-1) ** 2)
        return x_t, sigma_t, subinterval_denoising_target(x_t, x_s, a_s, s_s, a_t, s_t), weight

    def regression_term(self, ids: Tensor) -> Tensor:
        """DMD's regression loss (eq. 9) on one teacher ODE pair per sample of the batch (drawn from its index)."""
        noise, target, cond = self.regression
        idx = randint_per_sample(ids, len(noise), "dmd/regression", self.seed)
        z, y = noise[idx].to(self.device), cond_to(cond_index(cond, idx), self.device)
        sig = self.generator_sigmas[:1].to(self.device)
        x = self.model_sampling.noise_scaling(sig[0], z, torch.zeros_like(z), max_denoise=True)
        x0 = self.student(x, sig.expand(len(z)), **self.cond(y))
        return regression_loss(x0, target[idx].to(self.device))

    def critic_loss(self, ids: Tensor, x0: Tensor | None = None,
                    sigma_in: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Critic (fake score) denoising loss on generator samples, plus the GAN discriminator loss. ``x0`` (with
        the generator's input levels ``sigma_in``) reuses the samples of this batch's generator step."""
        ms = self.model_sampling
        labels = self.draw_labels(ids)
        if x0 is None or sigma_in is None:
            with torch.no_grad():
                x_in, sigma_in = self.generator_inputs(ids, labels)
                x0 = self.student(x_in, sigma_in, **self.cond(labels))
        x0 = x0.detach()
        logs: dict[str, Tensor] = {}
        if self.phased:
            x_t, sigma, target, weight = self.phase_renoise(ids, x0, sigma_in, "critic", with_target=True)
        else:
            sigma = self._renoise_sigma(ids, "critic/t", self.critic_t_range)
            x_t = ms.noise_scaling(sigma, self.randn(ids, "critic/noise"), x0)
            target, weight = x0, None
        pred, _ = self._critic_forward(x_t, sigma, labels)
        loss = fake_score_loss(self._native(sigma, pred, x_t), self._native(sigma, target, x_t), weight)
        logs["critic"] = loss.detach()
        if self.use_gan and self.gan_critic_weight > 0:
            idx = randint_per_sample(ids, len(self.real_data), "real/index", self.seed)
            xr = self.real_data[idx].to(self.device)
            yr = cond_to(cond_index(self.real_labels, idx), self.device) if self.real_labels is not None else labels
            sigma_g = self._renoise_sigma(ids, "gan/critic_t", self.gan_t_range)
            xf_t = ms.noise_scaling(sigma_g, self.randn(ids, "gan/critic_noise"), x0)
            xr_t = ms.noise_scaling(sigma_g, self.randn(ids, "real/noise"), xr)
            _, logits = self._critic_forward(torch.cat([xf_t, xr_t]), torch.cat([sigma_g, sigma_g]),
                                             cond_cat([labels, yr]))
            fake_logits, real_logits = logits.chunk(2)
            d = gan_discriminator_loss(real_logits, fake_logits)
            logs["gan_d"] = d.detach()
            logs["gan_d_acc"] = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
            loss = loss + self.gan_critic_weight * d
        return loss, logs

    # ----------------------------------------------------------------------------------------- step
    def _optimizer_step(self, index: int, opt: Any, loss: Tensor, params: list[nn.Parameter]) -> None:
        """One manual update of optimizer ``index`` (0 generator, 1 critic): backward, gradient sync across
        processes, norm clipping at ``grad_clip``, step, and the warm-up scheduler's step."""
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.sync_gradients(params)
        if self.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        if self.warmup_steps:
            self.lr_schedulers()[index].step()

    def is_generator_batch(self, batch: int) -> bool:
        """Whether batch number ``batch`` (0-based ``batches_seen``) updates the generator: every
        ``critic_ratio``-th batch after the ``critic_warmup`` critic-only batches."""
        return batch >= self.critic_warmup and (batch - self.critic_warmup) % self.critic_ratio == 0

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        self.disable_ddp_reducer()
        opt_g, opt_c = self.optimizers()
        ids = self.sample_ids()
        logs: dict[str, Tensor] = {}
        x0 = None
        if self.is_generator_batch(self.batches_seen):
            loss_g, x0, lg = self.generator_loss(ids)
            self._optimizer_step(0, opt_g, loss_g, self.student_trainable())
            self.generator_updates += 1
            self.student_updates += 1
            logs.update({f"train/{k}": v for k, v in lg.items()})
            logs["train/loss_g"] = loss_g.detach()
        loss_c, lc = self.critic_loss(ids, x0, self._last_generator_sigma if x0 is not None else None)
        self._optimizer_step(1, opt_c, loss_c, self.critic_parameters())
        self.critic_updates += 1
        self.batches_seen += 1
        logs.update({f"train/{k}": v for k, v in lc.items()})
        logs["train/loss_c"] = loss_c.detach()
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(ids))
        if self.max_generator_steps and self.generator_updates >= self.max_generator_steps:
            self.trainer.should_stop = True
        return {"loss": loss_c.detach(), **{k.split("/", 1)[1]: v for k, v in logs.items()}}

    # ------------------------------------------------------------------------------------- sampling
    def sampling_plan(self) -> dict[str, Any]:
        sig = torch.cat([self.generator_sigmas, torch.zeros(1)])
        return {"denoiser": self.student, "sampler": "onestep" if len(self.generator_sigmas) == 1 else "dmd",
                "sigmas": sig, "extra": {}}


def _check_range(r: tuple[float, float], name: str) -> tuple[float, float]:
    if len(r) != 2 or not 0.0 <= r[0] < r[1] <= 1.0:
        raise ValueError(f"{name} must be (lo, hi) with 0 <= lo < hi <= 1 (fractions of the noise range), got {r}")
    return float(r[0]), float(r[1])


def _regression_pairs(pairs: Any, sample_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """``(noise, endpoint, cond)`` from a trajectory folder or a dict (see ``DMD2Distillation``'s Args)."""
    from pathlib import Path

    if isinstance(pairs, (str, Path)):
        from ..core.trajectories import load_trajectories

        pairs, _ = load_trajectories(pairs)
    missing = [k for k in ("noise", "endpoint", "cond") if k not in pairs]
    if missing:
        raise ValueError(f"regression_pairs lack {missing}; give noise, endpoint and cond tensors")
    noise, target = torch.as_tensor(pairs["noise"]).float(), torch.as_tensor(pairs["endpoint"]).float()
    cond = real_conditions(pairs["cond"])
    if tuple(noise.shape[1:]) != sample_shape or noise.shape != target.shape or cond_len(cond) != len(noise):
        raise ValueError(f"regression_pairs: noise {tuple(noise.shape)}, endpoint {tuple(target.shape)} and "
                         f"{cond_len(cond)} conditions must be N samples of shape {sample_shape}")
    return noise, target, cond
