"""Sharded training of the distillation modules: FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``.

Zhao et al. 2023, "PyTorch FSDP" and its per-parameter successor FSDP2 (``torch.distributed.fsdp.fully_shard``):
every network is split into units (its outermost repeated blocks, then the rest), each unit's parameters are
sharded along dim 0 over the data-parallel processes, all-gathered for a forward and freed again afterwards, and
gradients are reduce-scattered (averaged) into the shards. What the distillation modules need on top:

- ``FSDP2Strategy``: ``ModelParallelStrategy`` with all processes on the data-parallel mesh dimension (Lightning's
  default puts them on the tensor-parallel one); works on ``accelerator="cpu"`` with gloo.
- ``shard_module``: the ``configure_model`` policy. The teacher, the student and the critic networks (and the GAN
  head) are sharded unit by unit; the frozen teacher is sharded too (it has no optimizer state). A LoRA student
  shares the teacher's network, so it is sharded once. Guidance adapters act through forward hooks on the base
  network's layers (their own ``forward`` never runs, so FSDP could not all-gather them): they stay replicated,
  and their gradients are averaged by ``sync_replicated_gradients``.
- ``clip_grad_norm``: gradient-norm clipping over a mix of sharded (DTensor) and replicated gradients.
- ``full_tensor`` / ``like_param``: state kept per parameter (EMA, consistency targets) is gathered to full tensors
  for the checkpoint's metadata and sharded again like its parameter on load.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = ()  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for pure FSDP2: every process on the ``"data_parallel"`` mesh dimension.

    Args:
        save_distributed_checkpoint: each rank writes its shards (a checkpoint folder) instead of rank 0 writing
            full tensors into one file.
        activation_checkpointing: recompute the blocks of the student's diffusers network in the backward pass
            instead of keeping their activations (``enable_gradient_checkpointing``; not with guidance adapters).
        kwargs: passed to ``ModelParallelStrategy`` (``process_group_backend``, ``timeout``).
    """

    def __init__(self, save_distributed_checkpoint: bool = True, activation_checkpointing: bool = False,
                 **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.activation_checkpointing = bool(activation_checkpointing)

    @override
    def setup_environment(self) -> None:
        """Resolve ``data_parallel_size="auto"`` to every process (nodes x processes), then set up as Lightning does."""
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


# ------------------------------------------------------------------------------------------------- policy
def data_parallel_mesh(module: nn.Module) -> Any:
    """The data-parallel ``DeviceMesh`` the strategy gave ``module`` (``None`` outside a sharding strategy)."""
    mesh = getattr(module, "_device_mesh", None)
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    return mesh["data_parallel"] if "data_parallel" in names else mesh


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (it was sharded by ``shard_module``)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def block_modules(net: nn.Module) -> list[nn.Module]:
    """The FSDP units of a network: the elements of its outermost ``nn.ModuleList``s (transformer blocks, UNet
    down/up blocks), each holding parameters; the network itself is the last unit (the rest)."""
    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                units.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                visit(child)

    visit(net)
    return units


# submodules a network's own forward calls from outside their block (they become units of their own, so FSDP
# all-gathers them when they are called): diffusers' DiT runs block 0's timestep/class embedding for its output norm
OUTSIDE_CALLS: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("transformer_blocks.0.norm1.emb",),
}


def outside_calls(net: nn.Module) -> list[nn.Module]:
    """The submodules of ``net`` listed in ``OUTSIDE_CALLS`` for its class (those present)."""
    mods = dict(net.named_modules())
    return [mods[n] for n in OUTSIDE_CALLS.get(type(net).__name__, ()) if n in mods]


def networks(module: nn.Module) -> Iterator[nn.Module]:
    """The modules ``shard_module`` shards: networks inside denoisers and plain trainable modules (GAN heads);
    guidance adapters are skipped (they stay replicated)."""
    from ..core.guidance.adapters import GuidanceAdapter

    seen: set[int] = set()

    def walk(m: nn.Module) -> Iterator[nn.Module]:
        if isinstance(m, GuidanceAdapter):
            return
        if hasattr(m, "adapter") and isinstance(getattr(m, "denoiser", None), nn.Module):  # AdaptedDenoiser
            yield from walk(m.denoiser)
            return
        net = getattr(m, "model", None)
        target = net if isinstance(net, nn.Module) else m
        if id(target) not in seen and any(True for _ in target.parameters()):
            seen.add(id(target))
            yield target

    for child in module.children():
        yield from walk(child)


def shard_network(net: nn.Module, mesh: Any, mp_policy: Any = None, activation_checkpointing: bool = False
                  ) -> nn.Module:
    """``fully_shard`` the blocks of ``net`` and then ``net`` itself (no-op if it is sharded already); with
    ``activation_checkpointing`` a diffusers network recomputes its blocks in the backward pass."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(net, FSDPModule):
        return net
    if activation_checkpointing and getattr(net, "_supports_gradient_checkpointing", False):
        net.enable_gradient_checkpointing()
    # the root unit keeps its parameters gathered after a forward (FSDP2's default; resharding it breaks a backward
    # through frozen parameters, e.g. the critic under the generator loss): after changing shards in place call
    # ``reshard`` so that the next forward gathers them again
    kw = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy is not None else {})}
    for sub in outside_calls(net):
        fully_shard(sub, **kw)
    for block in block_modules(net):
        fully_shard(block, **kw)
    fully_shard(net, **kw)
    return net


def shard_module(module: nn.Module, mp_policy: Any = None, activation_checkpointing: bool | None = None) -> bool:
    """The ``configure_model`` of the distillation modules: shard every network (teacher, student, critic, GAN head)
    over the data-parallel mesh. Returns ``False`` (and does nothing) outside a sharding strategy.

    ``activation_checkpointing`` defaults to the strategy's setting. Guidance adapters act through hooks whose
    state exists only during the forward, so a recomputed block would miss them: refused with them.
    """
    mesh = data_parallel_mesh(module)
    if mesh is None:
        return False
    if activation_checkpointing is None:
        trainer = getattr(module, "_trainer", None)
        activation_checkpointing = bool(getattr(getattr(trainer, "strategy", None), "activation_checkpointing", False))
    if activation_checkpointing:
        from ..core.guidance.adapters import GuidanceAdapter

        if any(isinstance(m, GuidanceAdapter) for m in module.modules()):
            raise ValueError("activation_checkpointing does not work with guidance adapters (their hooks are only "
                             "active during the forward): use FSDP2Strategy(activation_checkpointing=False)")
    # recomputation only in the student's network: the critic's parameters are frozen for the generator loss and
    # trainable when recomputed in the backward pass, so its recomputed graph would differ (torch refuses that)
    student = getattr(module, "student", None)
    ac_ids = {id(n) for n in networks(nn.ModuleList([student]))} if activation_checkpointing and student else set()
    for net in list(networks(module)):
        shard_network(net, mesh, mp_policy, id(net) in ac_ids)
    return True


def reshard(module: nn.Module) -> None:
    """Free the gathered parameters of every FSDP unit in ``module`` (call after writing into the shards in place,
    e.g. swapping EMA weights in or out; a no-op for unsharded modules)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ----------------------------------------------------------------------------------------------- gradients
def replicated(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that are not sharded (FSDP already averaged the gradients of the sharded ones)."""
    return [p for p in params if not isinstance(p, DTensor)]


def sync_replicated_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of the replicated (non-DTensor) ``params`` over all processes."""
    import torch.distributed as dist

    grads = [p.grad for p in replicated(params) if p.grad is not None]
    if not grads or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, s in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(s)


@torch.no_grad()
def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients of ``params`` so that their global 2-norm is at most ``max_norm``
    (``torch.nn.utils.clip_grad_norm_`` over sharded and replicated gradients together). Returns the norm.

    A sharded gradient contributes the sum of squares of its local shard, summed over the processes; a
    replicated one (identical on every process after averaging) contributes its own sum of squares once.
    """
    import torch.distributed as dist

    sharded = [p.grad.to_local() for p in params if p.grad is not None and isinstance(p.grad, DTensor)]
    plain = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    dev = (sharded + plain)[0].device if sharded or plain else torch.device("cpu")
    sq_sharded = sum((g.double().pow(2).sum() for g in sharded), torch.zeros((), dtype=torch.float64, device=dev))
    if sharded and dist.is_initialized():
        dist.all_reduce(sq_sharded)
    sq_plain = sum((g.double().pow(2).sum() for g in plain), torch.zeros((), dtype=torch.float64, device=dev))
    norm = (sq_sharded + sq_plain).sqrt().float()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in sharded + plain:
        g.mul_(coef.to(g.dtype))
    return norm


# -------------------------------------------------------------------------------------- per-parameter state
def full_tensor(t: Tensor) -> Tensor:
    """The full tensor of a DTensor (a collective: every process must call it), else ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(t: Tensor, param: Tensor) -> Tensor:
    """``t`` (a full tensor) placed like ``param``: sharded the same way if ``param`` is a DTensor."""
    if isinstance(param, DTensor):
        if isinstance(t, DTensor):
            return t.to(param.device, param.dtype)
        full = t.to(param.device, param.dtype)
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return t.to(param.device, param.dtype)
