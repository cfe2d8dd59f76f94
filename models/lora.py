"""Low-rank adapters (LoRA, Hu et al., arXiv:2106.09685), written here rather than taken from peft.

A targeted linear layer keeps its weight W [out, in] frozen and learns a low-rank update:

    h = W x + b + (alpha / r) * B A dropout(x)          A [r, in], B [out, r], r << min(in, out)

A starts random (Kaiming-uniform, as in the paper's reference code) and B at zero, so at
initialisation B A = 0 and the adapted model computes exactly what the base model does.
Only A and B train: for the 7B decoder at r = 16 that is about 40M parameters instead of
8.4B, so gradients and AdamW state shrink by two hundred times, and the frozen base can stay
in bf16.

Design choices, and why:
  - ``LoRALinear`` subclasses ``nn.Linear`` and keeps the base layer's own ``weight`` and
    ``bias`` attributes: the base weights keep their checkpoint names
    (``...q_proj.weight``), so loading, FSDP2 sharding and export need no renaming; the
    adapters add ``...q_proj.lora_A`` and ``...q_proj.lora_B``.
  - The adapters are fp32 whatever the base's dtype: they are the master weights the
    optimizer updates; the low-rank product is computed in the layer input's dtype (bf16
    on a GPU), as FSDP2 mixed precision would cast any parameter.
  - ``adapters_disabled(model)`` switches every adapter off inside a block: the model is
    then exactly its base, which is the GRPO reference policy (no second copy of the
    weights is needed).
  - ``merge_adapters_(model)`` folds B A into W in place and starts fresh adapters (B = 0,
    A drawn again): the model's function is unchanged and the adapters start again from
    B A = 0. The trainer uses it at the end of the format warm-up, so
    that "adapters off" becomes the warmed-up model.
  - ``merged_state_dict(state, scaling)`` does the same on a plain (gathered) state dict
    and drops the adapter keys: the export is an ordinary transformers checkpoint.

Module names are matched with ``re.fullmatch`` against ``model.named_modules()`` names
(transformers 5 layout: ``model.language_model.layers.0.self_attn.q_proj``). ``TARGET_GROUPS``
names the usual sets; any other entry of ``targets`` is used as a regular expression.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Named sets of target modules; an entry of `targets` that is not a key here is a regex.
# Module names of both families: Qwen2-Audio's (model.language_model..., model.audio_tower...,
# model.multi_modal_projector) and Qwen2.5-Omni's thinker (the same in transformers 5.24;
# model.layers... and audio_tower... in 5.17; its projector is the encoder's last layer, proj).
TARGET_GROUPS = {
    # the Qwen2 decoder's attention and MLP projections (the usual LoRA targets)
    "decoder": r"model\.(language_model\.)?layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    # the Whisper-style audio encoder's attention and MLP projections
    "audio_encoder": r"(model\.)?audio_tower\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)",
    # the audio-to-text projector (one linear layer)
    "projector": r"model\.multi_modal_projector\.linear|(model\.)?audio_tower\.proj",
    # the output head: a rank-r change of the logits. A trained model does not need it; a
    # random tiny one does (its frozen head and norms cap how peaked any output can be)
    "lm_head": r"lm_head",
}

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def target_patterns(targets: list[str]) -> list[re.Pattern]:
    """Compile `targets` (group names of TARGET_GROUPS or regular expressions)."""
    return [re.compile(TARGET_GROUPS.get(t, t)) for t in targets]


def is_target(name: str, patterns: list[re.Pattern]) -> bool:
    return any(p.fullmatch(name) for p in patterns)


class LoRALinear(nn.Linear):
    """A linear layer with a frozen base and a trainable low-rank update (see the module doc).

    Built from an existing ``nn.Linear`` (its ``weight`` and ``bias`` parameters are taken
    over, not copied): ``LoRALinear(base, rank=r, alpha=alpha, dropout=p)``.
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's parameters are reused as they are
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # [out, in]
        self.bias = base.bias  # [out] or None
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: the layer is its base (the reference policy)
        factory = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # [out, r]
        self.reset_adapter(generator)

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's own init: Kaiming-uniform with a = sqrt(5)),
        B = 0: B A = 0, the base's function. ``generator``: where A's draw comes from."""
        if self.lora_A.device.type != "meta":
            bound = 1.0 / math.sqrt(self.in_features)
            draw = torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator)
            self.lora_A.copy_(draw)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        # The low-rank path runs in the input's (compute) dtype: the fp32 masters are cast,
        # not x, so backward keeps the x the base layer saved instead of an fp32 copy of it
        # per adapter (for a bf16 7B decoder that copy would cost more than the layer itself).
        cast = getattr(self, "_cast", None)  # set by adapters_cast_once: A, B in the compute dtype
        A, B = cast if cast is not None and cast[0].dtype == x.dtype else (self.lora_A.to(x.dtype),
                                                                            self.lora_B.to(x.dtype))
        low = F.linear(self.dropout(x), A)  # [..., r]
        return y + F.linear(low, B) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: list[str] = ("decoder",), seed: int = 0) -> list[str]:
    """Replace every targeted ``nn.Linear`` of ``model`` by a ``LoRALinear``, in place; freeze
    everything else. Returns the replaced modules' names; none found is a ValueError.

    The A matrices are drawn from a generator seeded with ``seed``, not the global RNG: a
    run's adapters are the same on every rank and on every repetition of the run.

    Call it on the plain model, before FSDP2 sharding and activation checkpointing (both
    wrap modules; the names they see are then the adapted ones).
    """
    patterns = target_patterns(list(targets))
    model.requires_grad_(False)  # the base is frozen: only the adapters below train
    replaced = []
    generator = torch.Generator().manual_seed(seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and is_target(name, patterns):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout, generator=generator))
            replaced.append(name)
    if not replaced:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of the model")
    return replaced


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """What an adapter adds to its layer's weight, (alpha / r) B A: A [r, in], B [out, r] -> [out, in], in fp32."""
    return (lora_B.float() @ lora_A.float()) * scaling


def is_adapter_key(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


@contextlib.contextmanager
def adapters_cast_once(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[nn.Module]:
    """Inside the block each adapter's fp32 A and B are cast to `dtype` (default: its base
    weight's, the layer's compute dtype) once, not at every call
    (a rollout calls every adapted layer once per token: for the bf16 7B decoder's 196 adapters,
    two casts each per token). For blocks without gradients, where the weights do not change.
    Adapters sharded by FSDP2 are left alone (its mixed precision casts them when it gathers)."""
    modules = [m for m in (lora_modules(model) if isinstance(model, nn.Module) else [])
               if m.lora_A.dtype != (dtype or m.weight.dtype) and type(m.lora_A.data).__name__ != "DTensor"]
    for m in modules:
        m._cast = (m.lora_A.detach().to(dtype or m.weight.dtype), m.lora_B.detach().to(dtype or m.weight.dtype))
    try:
        yield model
    finally:
        for m in modules:
            m._cast = None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every adapter is off: ``model`` computes its base (the reference)."""
    modules = lora_modules(model)
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, before):
            m.enabled = was


def _local(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter: adapters are small."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local_part(param: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tensor this rank stores for ``param``, the same part of ``full``).

    A plain tensor is its own storage. For an FSDP2 DTensor the storage is this rank's local
    shard, wherever it lives (the GPU, or the CPU with offload), and the part of ``full`` is
    cut by the shard's global offset: no full-size tensor moves between devices or through
    ``distribute_tensor``, whose copy to the mesh's device would meet a CPU-offloaded shard."""
    if not hasattr(param, "device_mesh"):
        return param, full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()  # under no_grad: the shard's own storage, written in place below
    return local, full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _assign(param: torch.Tensor, full: torch.Tensor, *, add: bool = False) -> None:
    """param <- full (or param + full, summed in fp32 and rounded once to param's dtype), for a
    plain tensor or this rank's shard of an FSDP2 DTensor (every rank holds the same ``full``)."""
    target, part = _local_part(param, full)
    part = part.to(device=target.device, dtype=torch.float32)
    target.copy_((target.float() + part if add else part).to(target.dtype))


@torch.no_grad()
def merge_adapters_(model: nn.Module, *, seed: int = 0) -> None:
    """W <- W + (alpha / r) B A for every adapter, then fresh adapters: B <- 0 and A drawn
    again as at initialisation. The model computes the same; the adapters start again from
    B A = 0 at their initial scale (a trained A can be much larger, which would make the
    first steps on B correspondingly larger).

    A is drawn from a generator seeded with ``seed`` and the adapter's index, not from the
    global RNG: every rank draws the same A, and a run's sampling stream is untouched.
    A collective under FSDP2 (every rank calls it): A and B are gathered (they are small)
    and each rank updates its shard of W.
    """
    for i, m in enumerate(lora_modules(model)):
        A, B = _local(m.lora_A).float(), _local(m.lora_B).float()
        _assign(m.weight, lora_delta(A, B, m.scaling), add=True)  # [out, in]
        bound = 1.0 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)), as reset_adapter
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        _assign(m.lora_A, torch.empty(A.shape).uniform_(-bound, bound, generator=gen))
        _assign(m.lora_B, torch.zeros(B.shape))


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A full state dict with adapters -> the merged model's state dict, adapter keys dropped.

    ``W' = W + scaling * B A`` for each ``<prefix>.weight`` that has ``<prefix>.lora_A`` and
    ``<prefix>.lora_B``; computed in fp32, stored in W's dtype. Pure: ``state`` is unchanged.
    """
    merged = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for key in state:
        if key.endswith(".lora_A"):
            prefix = key[: -len(".lora_A")]
            w = state[prefix + ".weight"]
            delta = lora_delta(state[key], state[prefix + ".lora_B"], scaling)  # [out, in]
            merged[prefix + ".weight"] = (w.float() + delta).to(w.dtype)
    return merged


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter tensors of a state dict."""
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def save_adapters(state: dict[str, torch.Tensor], out_dir: str | Path, *, rank: int, alpha: float,
                  dropout: float, targets: list[str]) -> Path:
    """Write the adapters of a full state dict as safetensors, with their settings as JSON."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(state).items()}
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(
        {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets)}, indent=2))
    return out


@torch.no_grad()
def load_adapters(model: nn.Module, adapter_dir: str | Path) -> None:
    """Copy saved adapters into a model that ``apply_lora`` adapted with the same settings.

    The adapters are safetensors (no code can run on reading them); a missing, cut-short or
    garbled file is a CheckpointError naming it, before any parameter is changed."""
    from safetensors.torch import load_file

    from models.loading import CheckpointError, check_safetensors

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    check_safetensors(weights)
    try:
        saved = load_file(str(weights))
    except Exception as err:  # what the header check cannot see (safetensors' own checks)
        raise CheckpointError(f"{weights} cannot be loaded ({type(err).__name__}: {err})") from None
    # names as saved: without the prefixes of module wrappers (activation checkpointing, compile)
    params = {re.sub(r"(_checkpoint_wrapped_module|_orig_mod)\.", "", k): v for k, v in model.named_parameters()}
    missing = sorted(set(k for k in params if is_adapter_key(k)) - set(saved))
    unknown = sorted(set(saved) - set(params))
    if missing or unknown:
        raise ValueError(f"{adapter_dir}: adapters do not match the model (missing {missing[:3]}, "
                         f"unknown {unknown[:3]})")
    for k, v in saved.items():
        params[k].copy_(v)


def count_adapter_parameters(model: nn.Module) -> int:
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model))
