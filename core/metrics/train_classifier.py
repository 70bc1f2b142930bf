"""Train the benchmark's feature network (``classifier.DigitsClassifier``) on the digits train split.

Run ``python -m fewstep.core.metrics.train_classifier`` to regenerate the shipped
``weights/digits_classifier.safetensors`` and ``weights/digits_classifier.json`` (under a minute
on two idle CPU cores). Training is seeded; light augmentation (random sub-pixel shifts, small rotations and
scalings, a little pixel noise) makes the classifier robust to the slightly imperfect digits a
few-step sampler produces. The held-out split is only used to report accuracy, never to select weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..checks import nonneg_int, positive_int
from ..io import save_safetensors, write_json
from ..models.digits import load_digits_tensors
from .classifier import DEFAULT_CONFIG, WEIGHTS_PATH, DigitsClassifier

__all__ = ["augment", "evaluate_accuracy", "train_classifier"]

#: where a retrained classifier goes by default (the working directory, never the package's shipped weights)
DEFAULT_OUT = Path("fewstep-classifier") / "digits_classifier.safetensors"


def augment(
    x: Tensor,
    generator: torch.Generator,
    max_shift: float = 1.5,
    max_rotate_deg: float = 10.0,
    max_scale: float = 0.1,
    noise_std: float = 0.05,
) -> Tensor:
    """Random affine jitter of ``(N, C, H, W)`` images in ``[-1, 1]`` (background -1), plus pixel noise.

    Shifts are in pixels (uniform in ``[-max_shift, max_shift]``), rotations in degrees, scalings
    uniform in ``[1 - max_scale, 1 + max_scale]``; bilinear resampling, out-of-image pixels are -1.
    """
    n, _, h, w = x.shape

    def u(lo: float, hi: float) -> Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = u(-max_rotate_deg, max_rotate_deg) * (math.pi / 180.0)
    scale = u(1.0 - max_scale, 1.0 + max_scale)
    tx, ty = u(-max_shift, max_shift) * (2.0 / w), u(-max_shift, max_shift) * (2.0 / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    # grid_sample pads with 0; shift to a [0, 2] range so the padding is the -1 background
    out = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    if noise_std > 0:
        out = out + noise_std * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(
            out.shape, generator=generator
        )
    return out.clamp(-1.0, 1.0)


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (eval mode is the caller's business)."""
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
    return correct / max(len(images), 1)


def train_classifier(
    out_path: str | os.PathLike[str] = DEFAULT_OUT,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 5e-4,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the digits classifier and write ``out_path`` (safetensors) and ``out_path.with_suffix('.json')``.

    AdamW with a one-cycle cosine schedule and label smoothing 0.05 on the train split with
    ``augment``; the final weights are kept. Returns the JSON metadata (architecture, held-out accuracy,
    train accuracy, train time, seed, hyper-parameters).
    """

    out_path = Path(out_path)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits_tensors("train")
    x_held, y_held = load_digits_tensors("heldout")

    model = DigitsClassifier(**DEFAULT_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15, anneal_strategy="cos"
    )

    t0 = time.perf_counter()
    bar = tqdm(range(epochs), desc="digits classifier", disable=not progress)
    for _ in bar:
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = augment(x_train[idx], gen), y_train[idx]
            loss = F.cross_entropy(model(xb), yb, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        model.eval()
        bar.set_postfix(
            loss=f"{total / count:.3f}", heldout=f"{evaluate_accuracy(model, x_held, y_held):.4f}"
        )
    train_time = time.perf_counter() - t0

    model.eval()
    held_acc = evaluate_accuracy(model, x_held, y_held)
    train_acc = evaluate_accuracy(model, x_train, y_train)
    meta: dict[str, Any] = {
        "architecture": dict(model.config),
        "heldout_accuracy": held_acc,
        "train_accuracy": train_acc,
        "train_time_s": round(train_time, 2),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "data": "sklearn.datasets.load_digits, 16x16 bilinear, [-1,1], stratified 80/20 split seed 0",
    }
    save_safetensors(model.state_dict(), out_path, header={"format": "pt"})
    write_json(Path(out_path).with_suffix(".json"), meta, sort_keys=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output .safetensors path (default ./{DEFAULT_OUT}; "
                        f"the shipped {WEIGHTS_PATH.name} is never written)")
    parser.add_argument("--seed", type=nonneg_int, default=0)
    parser.add_argument("--epochs", type=positive_int, default=30)
    args = parser.parse_args(argv)
    meta = train_classifier(args.out, seed=args.seed, epochs=args.epochs)
    print(json.dumps({k: meta[k] for k in ("heldout_accuracy", "train_accuracy", "train_time_s", "seed")}))


if __name__ == "__main__":
    main()
