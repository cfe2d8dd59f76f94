"""Multi-process training support: process group, FSDP2 sharding, rollout gathering, export.

The trainer runs one process per device (``torchrun --nproc_per_node N train.py``, or plain
``python train.py`` for a single process). This module owns everything that depends on that:

- ``init_distributed()`` / ``cleanup()``: the process group, from torchrun's environment.
- ``shard_model(model)``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over either family
  (Qwen2-Audio, Qwen2.5-Omni's thinker), one FSDP unit per encoder layer and per decoder layer, plus one per module that
  ``models.policy`` calls directly (it never calls ``model.forward``). The same call with
  ``frozen=True`` shards the frozen reference policy.
- ``gathered_params(model)``: keep all parameters unsharded for a rollout phase, so that
  decoding does not all-gather the weights once per generated token.
- ``export_checkpoint(...)``: gather the full weights and write a Hugging Face checkpoint
  directory from rank 0.

Gradient reduction. FSDP2 *averages* gradients over ranks (``grad_reduce="mean"``, the
default). Each rank's loss is its share of the whole optimizer batch's loss (normalised by
the global denominator: completions or tokens counted over all micro-batches and all ranks),
so the trainer multiplies it by ``world_size`` before ``backward()`` and the averaged
gradient is the gradient of the whole batch. ``grad_reduce="sum"`` makes the reduce-scatter
a plain sum instead (divide factor 1), for a trainer that does not scale its loss.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import os
import shutil
import traceback
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

# The FSDP2 entry points live in torch.distributed.fsdp since torch 2.6.
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from models.collectives import broadcast_object
from models.loading import RowReader, empty_model, load_model, save_checkpoint
from models.policy import audio_tower, text_decoder

__all__ = [
    "DistInfo",
    "init_distributed",
    "cleanup",
    "barrier",
    "is_main_process",
    "get_rank",
    "shard_model",
    "is_sharded",
    "load_sharded",
    "gathered_params",
    "full_state_dict",
    "export_checkpoint",
]

# Module wrappers that add a prefix to parameter names; Hugging Face checkpoints never have them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")

# Attribute stored on each FSDP module by ``shard_model``: its reshard-after-forward setting,
# which ``gathered_params`` turns off for a rollout phase and restores afterwards.
_RESHARD_ATTR = "_grpo_reshard_after_forward"

# Every DeviceMesh ``shard_model`` sharded over: ``cleanup`` releases the process groups they hold.
_MESHES: "weakref.WeakSet" = weakref.WeakSet()


# --------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: its global rank, the number of processes, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    *, device: str | torch.device | None = None, timeout_s: float | None = None
) -> DistInfo:
    """Initialise the process group from torchrun's environment and pick this rank's device.

    Steps:
        1. Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (set by torchrun; absent when the
           script is started as a plain single process, which then counts as rank 0 of 1).
        2. Pick the device: ``cuda:LOCAL_RANK`` when CUDA is available (and made current),
           else the CPU; ``device="cpu"`` forces the CPU even on a GPU machine. Without
           CUDA, GPUs asked for (``device="cuda"``) or several processes on this machine
           (torchrun's ``LOCAL_WORLD_SIZE`` > 1) are a RuntimeError saying why (the build's
           CUDA version, the driver it needs, a build for older drivers), unless the CPU was
           asked for (``device="cpu"``, or every GPU hidden: ``CUDA_VISIBLE_DEVICES=""``).
        3. Initialise the default process group unless one exists: NCCL for CUDA tensors
           (plus gloo for CPU tensors) on GPUs, gloo on the CPU. Launched by torchrun, the
           rendezvous is ``MASTER_ADDR``/``MASTER_PORT``; started un-launched, a
           one-process group on an in-memory store, so that
           ``shard_model`` and ``export_checkpoint`` run the very same code for 1 process
           (FSDP2 with one rank still gives bf16 compute over fp32 weights and CPU offload).

    Args:
        device: ``None`` or ``"auto"`` (CUDA when available, else CPU: one process only),
            ``"cpu"`` or ``"cuda"``.
        timeout_s: collective timeout; ``None`` keeps torch's default.

    Returns:
        A ``DistInfo``.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    launched = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ

    requested = torch.device(device) if device not in (None, "auto") else None
    use_cuda = torch.cuda.is_available() if requested is None else requested.type == "cuda"
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpu_asked = requested is not None and requested.type == "cpu" or _gpus_hidden()
    if not torch.cuda.is_available() and (use_cuda or (local_processes > 1 and not cpu_asked)):
        # several processes on one machine, or GPUs asked for: a CPU run would be a silent
        # fallback (a 7B on CPUs), so it is one line saying why and what to do
        why = "GPUs were asked for (device cuda)" if use_cuda else f"{local_processes} processes on this machine"
        raise RuntimeError(f"{why} but CUDA is not available: {cuda_unavailable_reason()}")
    if use_cuda:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        # Make the device current before NCCL creates its communicators on it.
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")

    if not dist.is_initialized():
        # On GPUs, gloo serves CPU tensors beside NCCL: with CPU offload the gradients (and
        # so clip_grad_norm_'s all-reduce) live on the CPU, and small metrics may too.
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        kwargs = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        if use_cuda:
            # Binding the device lets NCCL set up eagerly and makes dist.barrier() use it.
            kwargs["device_id"] = dev
        if launched:
            dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
        else:
            if world_size != 1:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but MASTER_ADDR is unset: start with torchrun"
                )
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev
    )


# The oldest Linux driver each CUDA major release of a torch build runs on (NVIDIA's CUDA
# compatibility guide: minor-version compatibility within a major release).
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
OLDER_DRIVER_INDEX = "https://download.pytorch.org/whl/cu126"  # CUDA 12.6 wheels: driver >= 525


def _gpus_hidden() -> bool:
    """True when the user hid every GPU (``CUDA_VISIBLE_DEVICES`` set and empty, or -1): CPU asked for."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1")


def cuda_unavailable_reason() -> str:
    """Why this torch sees no GPU and what to install, in one line: the build's CUDA version,
    the driver it needs, the wheel index of a build for older drivers, how to ask for the CPU."""
    cpu = "or run on the CPU by asking for it (distribution.device=cpu, or CUDA_VISIBLE_DEVICES='')"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build, e.g. "
                f"pip install torch=={torch.__version__.split('+')[0]} --index-url {OLDER_DRIVER_INDEX}, {cpu}")
    major = int(torch.version.cuda.split(".")[0])
    driver = MIN_DRIVER.get(major)
    needs = f"an NVIDIA driver >= {driver}" if driver else "a matching NVIDIA driver"
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, which needs {needs} "
            f"(nvidia-smi shows the installed one); for a driver >= 525 install a CUDA 12.6 or 12.8 build: pip install "
            f"torch=={torch.__version__.split('+')[0]} --index-url {OLDER_DRIVER_INDEX} (or .../whl/cu128), {cpu}")


@contextlib.contextmanager
def torn_down_on_exit():
    """Run a script's body, then tear the process group down with ``cleanup``, whatever happens.

    A body that ends normally synchronises every rank first; one that raises (or is stopped)
    does not, since a peer may never arrive. On an error the traceback's frames are cleared
    before ``cleanup``: the failed run's frames hold its model, and the model holds the process
    group, which must go now and not during interpreter exit.
    """
    ended = False
    try:
        yield
        ended = True
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        cleanup(synchronise=ended)


def cleanup(*, synchronise: bool = True) -> None:
    """Tear the process group down now, while the interpreter is fully alive.

    Call it once at the end of the script, after dropping every sharded model and optimizer.

    Why it is more than ``destroy_process_group()``: a process group left for interpreter
    exit is torn down in no fixed order. A gloo worker thread may still be releasing the
    tensors of the last collective when Python has begun to finalise; a C++ thread that needs
    the GIL then is ended in the middle of C++ code, and the process aborts ("terminate called
    without an active exception", SIGABRT) after a run that finished its work. And
    ``destroy_process_group()`` alone frees nothing while a ``DeviceMesh`` lives: each mesh
    keeps its process groups, FSDP2 keeps the mesh, and DTensor's caches keep meshes for the
    life of the process. So the group must lose its last reference here, where destroying it
    joins its worker threads.

    Steps:
        1. Collect garbage: a dropped model or optimizer in a reference cycle lets go of its
           mesh now, not at exit.
        2. With ``synchronise`` (a run that ended normally), wait for every rank, so that no
           rank closes its connections while a peer still talks to it. After an error a peer
           may never arrive, so the caller passes ``False``.
        3. Release the process groups that the meshes ``shard_model`` made hold (torch 2.11's
           ``DeviceMesh`` keeps them in ``_pg_registry``; a torch whose mesh keeps only group
           names has nothing to release).
        4. Destroy the process group: now its last reference, so its backend and worker
           threads go with it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if synchronise:
        dist.barrier()
    for mesh in list(_MESHES):
        registry = getattr(mesh, "_pg_registry", None)
        if isinstance(registry, dict):
            registry.clear()
    _MESHES.clear()
    dist.destroy_process_group()
    gc.collect()


def barrier() -> None:
    """Wait for every rank; nothing to wait for without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def get_rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (the one that logs and writes files), and without a process group."""
    return get_rank() == 0


# --------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------


def _default_device_type() -> str:
    """The device type FSDP2 shards onto: CUDA under NCCL, else the CPU."""
    return "cuda" if "nccl" in str(dist.get_backend()).lower() else "cpu"


def _layer_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The two repeated-block lists of either family: encoder layers, then decoder layers."""
    return [audio_tower(model).layers, text_decoder(model).layers]


def _entry_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that ``models.policy`` calls directly, so each must be its own FSDP unit.

    FSDP2 unshards a unit's parameters in that unit's forward pre-hook. The policy calls
    these modules themselves rather than ``model.forward``; a module whose parameters were
    owned by an outer unit that never runs forward would compute with sharded parameters.
    Children come before parents (``fully_shard`` must be applied bottom-up). Qwen2.5-Omni's
    thinker has no separate projector (its encoder ends with one); its vision encoder is never
    called and stays with the root unit.
    """
    projector = getattr(model.model, "multi_modal_projector", None)
    return [
        audio_tower(model),
        *([projector] if projector is not None else []),
        model.get_input_embeddings(),  # the decoder's embed_tokens, called to embed prompts
        text_decoder(model),  # keeps its final norm
        model.lm_head,
    ]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (or any submodule) was passed through ``fully_shard``."""
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _resolve_param_dtype(param_dtype, device_type: str) -> torch.dtype | None:
    if param_dtype == "auto":
        # bf16 compute on GPUs; the CPU computes in the stored dtype (fp32).
        return torch.bfloat16 if device_type == "cuda" else None
    if param_dtype is None or isinstance(param_dtype, torch.dtype):
        return param_dtype
    raise ValueError(f"param_dtype must be 'auto', None or a torch.dtype, got {param_dtype!r}")


def _apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap every encoder and decoder layer in a non-reentrant activation checkpoint.

    ``checkpoint_wrapper`` (applied before ``fully_shard``, as TorchTitan does) recomputes
    the layer's forward in backward, FSDP's unshard included. It does not change parameter
    names seen by ``state_dict()`` and ``get_model_state_dict`` (both strip its prefix).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    for layers in _layer_lists(model):
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def _mesh_and_device_type(mesh, device: torch.device | str | None) -> tuple:
    """The 1-D mesh to shard over (``mesh``, or all ranks of the default process group) and
    its device type (the mesh's, ``device``'s, or CUDA under NCCL, else the CPU)."""
    if mesh is not None:
        device_type = mesh.device_type
    elif device is not None:
        device_type = torch.device(device).type
    else:
        device_type = _default_device_type()
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    _MESHES.add(mesh)
    return mesh, device_type


def _fully_shard_bottom_up(model: nn.Module, mesh, device_type: str, *, param_dtype, reduce_dtype,
                           cpu_offload: bool, reshard_after_forward: bool) -> None:
    """``fully_shard`` each encoder and decoder layer, then each module the policy calls
    directly, then the root, with the mixed-precision and offload policies."""
    mp_policy = MixedPrecisionPolicy(
        param_dtype=_resolve_param_dtype(param_dtype, device_type),
        reduce_dtype=reduce_dtype,
    )
    # Pinned host memory makes the host-to-GPU copies asynchronous; it needs CUDA.
    offload_policy = (
        CPUOffloadPolicy(pin_memory=device_type == "cuda") if cpu_offload else OffloadPolicy()
    )
    units = [layer for layers in _layer_lists(model) for layer in layers]
    units += _entry_modules(model)
    # The root comes last: it owns no parameter left over (all sit in the units above) but
    # ties them together: one lazy initialisation, one post-backward callback, recursive setters.
    for unit in [*units, model]:
        fully_shard(
            unit,
            mesh=mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=mp_policy,
            offload_policy=offload_policy,
        )
        setattr(unit, _RESHARD_ATTR, reshard_after_forward)


def shard_model(
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    mesh=None,
    param_dtype: torch.dtype | str | None = "auto",
    reduce_dtype: torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
    frozen: bool = False,
    grad_reduce: str = "mean",
    fill=None,
) -> nn.Module:
    """Shard a model of either family (Qwen2-Audio, Qwen2.5-Omni's thinker) over all ranks with FSDP2, in place, and return it.

    Load the model in float32 first: the sharded parameters are the fp32 master weights the
    optimizer updates (and so the optimizer state is sharded and, with ``cpu_offload``,
    lives on the CPU too); ``param_dtype`` is only the dtype of the computation.

    Steps:
        1. Refuse tied input/output embeddings (they would land in two FSDP units).
        2. For a frozen (reference) model: no gradients, eval mode.
        3. Optionally wrap every encoder/decoder layer in an activation checkpoint.
        4. ``fully_shard`` each encoder layer and each decoder layer, then each module the
           policy calls directly (audio tower, projector, input embeddings, language model,
           lm_head), then the root, with the mixed-precision and offload policies.
        5. With ``grad_reduce="sum"``, make the gradient reduction a plain sum over ranks.
        6. Initialise FSDP from the root now, so that the root owns every unit whichever
           module runs forward first (the policy never calls the root's forward).

    Args:
        model: a ``Qwen2AudioForConditionalGeneration`` or a Qwen2.5-Omni thinker (any device; FSDP moves the shards
            to the mesh's device, or keeps them on the CPU with ``cpu_offload``).
        device: the device to shard onto (only its type matters: each rank uses its current
            CUDA device); default: CUDA under NCCL, else the CPU.
        mesh: a 1-D ``DeviceMesh``; default: all ranks of the default process group on
            ``device``.
        param_dtype: compute dtype. ``"auto"``: bfloat16 on CUDA, the stored dtype (fp32)
            on the CPU. ``None``: the stored dtype. Or a ``torch.dtype``.
        reduce_dtype: dtype of the gradient reduce-scatter (fp32 keeps the sum exact enough).
        cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU
            (``CPUOffloadPolicy``); each unit is copied to the GPU for its compute.
        activation_checkpointing: recompute each layer's activations in backward.
        reshard_after_forward: free unsharded parameters after each unit's forward (ZeRO-3);
            ``False`` keeps them until backward (faster, ZeRO-2-like memory).
        frozen: the frozen reference policy: no gradients, eval mode, resharded after every
            forward (``reshard_after_forward`` does not apply: it never runs backward).
        grad_reduce: ``"mean"`` (default, stock FSDP2): gradients are averaged over ranks,
            so each rank's loss (its share of the global batch loss) must be multiplied by
            ``world_size``. ``"sum"``: gradients are summed; no ``world_size`` factor.
        fill: for a model built on the meta device (``load_sharded``): ``fill(model, device)``
            materialises this rank's shards after ``fully_shard`` and before FSDP's
            initialisation, which refuses meta parameters.

    Returns:
        The same ``model`` object, now an ``FSDPModule`` with DTensor parameters.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs a process group: call init_distributed() first")
    if grad_reduce not in ("sum", "mean"):
        raise ValueError(f"grad_reduce must be 'sum' or 'mean', got {grad_reduce!r}")

    # 1. Tied embeddings would be two FSDP units sharing one parameter.
    if model.lm_head.weight is model.get_input_embeddings().weight:
        raise NotImplementedError("shard_model does not support tied input/output embeddings")

    # 2. The reference policy never trains.
    if frozen:
        model.requires_grad_(False)
        model.eval()
        activation_checkpointing = False  # nothing to recompute without a backward
        # FSDP2 reshards a unit kept gathered after forward in its post-backward, and a frozen
        # model never runs backward: it would stay gathered for the whole run (15.6 GB per GPU
        # for the 7B in bf16), so the reference reshards after every forward, whatever was asked
        reshard_after_forward = True

    mesh, device_type = _mesh_and_device_type(mesh, device)

    # 3. Checkpoint wrappers go inside the FSDP units, so that recomputation re-runs the
    #    layer with its parameters unsharded by FSDP's pre-backward hook.
    if activation_checkpointing:
        _apply_activation_checkpointing(model)

    # 4. Shard bottom-up: layers, then the modules the policy calls, then the root.
    _fully_shard_bottom_up(model, mesh, device_type, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                           cpu_offload=cpu_offload, reshard_after_forward=reshard_after_forward)

    # 5. A divide factor of 1 with SUM collectives: the reduce-scatter adds the ranks'
    #    gradients and divides by nothing. Forcing SUM also keeps gloo (no PreMulSum) happy.
    if grad_reduce == "sum":
        for module in _fsdp_modules(model):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)

    if fill is not None:
        fill(model, torch.device("cpu") if cpu_offload or device_type == "cpu"
             else torch.device(device_type, torch.cuda.current_device()))

    # 6. FSDP2 makes the first unit to run forward the root of its own subtree. The policy
    #    calls submodules directly, so without this the audio tower, the embeddings and the
    #    language model would each become separate roots, and a later ``model(...)`` (e.g.
    #    Hugging Face ``generate`` in evaluation) would fail. Initialising from the true
    #    root makes every unit a non-root that may run forward on its own. (Private API:
    #    FSDP2 has no public lazy-init; ``_lazy_init`` is idempotent.)
    model._get_fsdp_state()._lazy_init()
    return model


_FALLBACKS_LOGGED: set = set()


def load_sharded(path, *, attn_implementation: str = "sdpa", prepare=None, **shard_kwargs) -> nn.Module:
    """The fp32 model of a checkpoint directory, sharded by ``shard_model``, with each rank
    reading only its own shards from the safetensors files (no rank ever holds a full copy).

    Steps:
        1. Build the model with its parameters on the meta device (``models.loading.empty_model``:
           buffers such as rotary ``inv_freq`` are computed as usual).
        2. ``prepare(model)`` (which parts train, eval mode), as on a loaded model.
        3. ``shard_model(model, **shard_kwargs)``: the same FSDP units, the same DTensors,
           still on the meta device; then ``_fill_shards`` gives each parameter its storage
           (``to_empty``) and reads this rank's rows of its Shard(0) from the file.

    A checkpoint whose tensor names or shapes are not the model's one to one is loaded whole by
    ``models.loading.load_model`` and sharded after (the reason logged once per process); so is
    everything when ``shard_kwargs`` asks for nothing this path cannot give.
    """
    model, sources = empty_model(path, dtype=torch.float32, attn_implementation=attn_implementation)
    if model is None:
        if sources not in _FALLBACKS_LOGGED and is_main_process():
            print(f"loading {path} whole on every rank, then sharding: {sources}", flush=True)
        _FALLBACKS_LOGGED.add(sources)
        model = load_model(path, dtype=torch.float32, device="cpu", attn_implementation=attn_implementation)
        if prepare is not None:
            prepare(model)
        return shard_model(model, **shard_kwargs)
    if prepare is not None:
        prepare(model)
    return shard_model(model, fill=lambda m, device: _fill_shards(m, sources, device), **shard_kwargs)


def _fill_shards(model: nn.Module, sources: dict, device: torch.device) -> None:
    """Materialise a model sharded on the meta device: storage for every parameter and buffer
    on ``device`` (``to_empty``), the buffers computed at construction put back, then each
    DTensor's local rows (its Shard(0): global offset and local shape from its placements) and
    each whole tensor read from the safetensors file ``sources`` names (``models.loading.RowReader``:
    file reads, no memory map), cast to the parameter's dtype."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    built = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(built[name])
        targets = {}
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            clean = _strip_wrapper_prefixes(name)
            if clean in sources:
                targets.setdefault(sources[clean][1], []).append((sources[clean][0], t))
        for file, entries in targets.items():
            with RowReader(file) as f:
                for key, t in entries:
                    if isinstance(t, DTensor):
                        if any(not p.is_shard(0) for p in t.placements if not p.is_replicate()):
                            raise RuntimeError(f"{key}: placements {t.placements} are not Shard(0)")
                        local = t.to_local()
                        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
                        if local.numel() == 0:
                            continue
                        local.copy_(f.rows(key, offset[0], offset[0] + shape[0]))
                    else:
                        t.copy_(f.rows(key, 0, f.shape(key)[0] if f.shape(key) else 1))


@contextlib.contextmanager
def gathered_params(model: nn.Module) -> Iterator[nn.Module]:
    """Keep every parameter unsharded inside the block (the rollout phase).

    Decoding runs one forward per new token; under plain FSDP each would all-gather every
    unit's parameters again. Inside this block each rank holds the full compute-dtype
    weights (about 16 GB for the 7B model in bf16) and forwards do no communication at
    all, so ranks whose completions end after different numbers of steps cannot hang each
    other. A no-op for an unsharded model.

    Steps:
        1. Turn off resharding after forward on every FSDP unit.
        2. All-gather every unit once.
        3. On exit (also on error): restore each unit's setting and free the full weights.
    """
    modules = _fsdp_modules(model)
    if not modules:
        yield model
        return
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
    try:
        # Issue every all-gather first, then wait, so the gathers can overlap.
        handles = [module.unshard(async_op=True) for module in modules]
        for handle in handles:
            if handle is not None:
                handle.wait()
        yield model
    finally:
        for module in modules:
            module.set_reshard_after_forward(getattr(module, _RESHARD_ATTR, True), recurse=False)
            module.reshard()


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def _strip_wrapper_prefixes(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the CPU, on rank 0; an empty dict on other ranks.

    A collective for a sharded model: every rank must call it. Keys are the names
    ``from_pretrained`` expects (``model.language_model.layers.0...``, ``lm_head.weight``),
    with any wrapper prefixes removed. ``trainable_only``: only parameters that require
    gradients (LoRA's adapters), without gathering the frozen base.
    """
    if trainable_only:
        names = {_strip_wrapper_prefixes(k) for k, p in model.named_parameters() if p.requires_grad}
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # full_state_dict + cpu_offload: shards are gathered one tensor at a time and
        # only rank 0 keeps the result, on the CPU.
        state = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                            ignore_frozen_params=trainable_only)
        )
        if not is_main_process():
            return {}
    else:
        state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    state = {_strip_wrapper_prefixes(k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k in names} if trainable_only else state


def _set_config_dtype(config, dtype: torch.dtype) -> None:
    """Record the saved tensors' dtype in the config (and sub-configs), so that loading with
    ``dtype="auto"`` gives back exactly the saved tensors."""
    configs = [config] + [
        getattr(config, key)
        for key in getattr(config, "sub_configs", {}) or {}
        if getattr(config, key, None) is not None
    ]
    for cfg in configs:
        cfg.dtype = dtype


def export_checkpoint(
    model: nn.Module,
    processor,
    generation_config,
    out_dir: str | os.PathLike,
    *,
    config=None,
    dtype: torch.dtype | None = None,
    transform=None,
) -> Path:
    """Write a checkpoint directory that ``from_pretrained`` and ``AutoProcessor`` load back.

    A collective for a sharded model: every rank must call it; only rank 0 writes.

    Steps:
        1. Gather the full state dict onto rank 0's CPU (``full_state_dict``).
        2. On rank 0: optionally cast floating tensors to ``dtype`` (e.g. bfloat16 halves
           the size of a 7B checkpoint); record the dtype in a copy of the config.
        3. Write it with ``models.loading.save_checkpoint`` (config, safetensors in the hub's
           key layout, processor files, generation config) into a temporary sibling
           directory, then rename that into place, so ``out_dir`` is never seen half-written
           (an existing ``out_dir`` is replaced).
        4. Rank 0 tells every rank whether it succeeded (so nobody reads ``out_dir`` before
           it exists, and a failure raises on every rank instead of hanging the others).

    Args:
        model: the trained model, sharded or not.
        processor: the processor to save with it.
        generation_config: the generation config to save with it.
        out_dir: the checkpoint directory to create.
        config: the model config to write; default ``model.config``.
        dtype: cast floating-point tensors to this dtype; default: keep the stored dtype.
        transform: applied on rank 0 to the gathered state dict before writing (LoRA:
            ``models.lora.merged_state_dict``, so the export is a plain merged model).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out_dir = Path(out_dir)
    state = full_state_dict(model)

    error = None
    if is_main_process():
        try:
            if transform is not None:
                state = transform(state)
            _write_atomically(state, model, processor, generation_config, out_dir, config, dtype)
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    # Share rank 0's outcome instead of a bare barrier: if writing failed, every rank
    # raises rather than waiting forever for rank 0.
    failed = broadcast_object(None if error is None else repr(error))  # a barrier as well
    if error is not None:
        raise error
    if failed is not None:
        raise RuntimeError(f"export_checkpoint failed on rank 0: {failed}")
    return out_dir


def _write_atomically(state, model, processor, generation_config, out_dir: Path, config, dtype) -> None:
    """Rank 0's part of ``export_checkpoint``: cast, fix the config's dtype, write to a
    temporary sibling directory with ``models.loading.save_checkpoint``, rename into place."""
    if dtype is not None:  # tensor by tensor in the same dict: each full-precision one is freed as it goes
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = v.to(dtype)
    config = copy.deepcopy(config if config is not None else model.config)
    float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(float_dtypes) == 1:
        _set_config_dtype(config, float_dtypes.pop())

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_checkpoint(state, config, processor, generation_config, tmp_dir)
        if out_dir.exists():
            # Move the old export aside first, so out_dir never holds a partial checkpoint.
            old_dir = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            out_dir.rename(old_dir)
            tmp_dir.rename(out_dir)
            shutil.rmtree(old_dir)
        else:
            tmp_dir.rename(out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
