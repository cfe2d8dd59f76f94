"""The memory plan: what a run will hold per GPU, from its config alone, before anything loads.

    python train.py --config configs/r1_aqa_lora_24gb.yaml --plan
    python train.py --config configs/r1_aqa.yaml --plan --gpus 8 --gpu-memory-gb 80

The model is built on the meta device (shapes, no weights: seconds for the 7B) from
model.path's config.json, the tiny model's keys, or, when model.path is not there, the
architecture file model.architecture names (Qwen2.5-Omni-3B/7B's thinker:
configs/qwen2_5_omni_{3b,7b}_random.yaml), by default Qwen2-Audio-7B-Instruct's
(configs/qwen2_audio_7b_random.yaml). LoRA is applied
to the meta model as the trainer would, so the trainable count is exact.

What is counted (bytes per GPU), as the trainer does it:

    weights      stored dtype: fp32 masters under FSDP2 (sharded over the ranks, on the CPU
                 with cpu_offload), else model.dtype; LoRA adapters are fp32
    gradients    one per trainable parameter, in its stored dtype (sharded under FSDP2)
    optimizer    AdamW: 2 states per trainable parameter, in its stored dtype
    reference    a frozen copy when beta > 0 without LoRA (with LoRA: none, adapters off;
                 grpo.reference.reference_kind decides)
    rollout      under FSDP2 the full weights gathered in the compute dtype (gathered_params),
                 the KV cache of generation_batch_prompts x G rows of P + T positions, the
                 [rows, V] fp32 logits of one decoding step (with top-p's sort)
    update       saved activations of one micro-batch: each prompt packed once with its G
                 completions (L = P + G*T positions per prompt) through every decoder layer
                 (only the layer inputs with activation checkpointing, plus one layer
                 recomputed), the audio encoder's when it gets gradients, and the log-softmax
                 chunk buffers ([1024, V] fp32, forward and backward)

The peak is the largest phase: persistent state + rollout, or persistent + gradients + update.
Per-token activation sizes come from the layer's structure (below); they are estimates,
validated against measured peaks (benchmarks/plan_check.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from grpo.config import Config, ConfigError
from grpo.reference import reference_kind

ROOT = Path(__file__).resolve().parents[1]
ARCH_7B = ROOT / "configs" / "qwen2_audio_7b_random.yaml"
GB = 2**30
TEXT_TOKENS = 128  # prompt text around the audio (system line, question, choices, headers): an upper bound
NO_GPU = "no GPU visible: assumed 80 GB (set --gpu-memory-gb)"
CUDA_OVERHEAD_GB = 1.0  # CUDA context and library workspaces, outside the tensors counted here


@dataclass
class Plan:
    """The plan's numbers (bytes) and what they assumed; ``render()`` writes it for people."""

    setting: dict
    persistent: dict  # name -> bytes held for the whole run
    rollout: dict  # name -> bytes held only while sampling
    update: dict  # name -> bytes held only during the update (gradients included)
    overhead: float
    device_bytes: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        base = sum(self.persistent.values()) + self.overhead
        return base + max(sum(self.rollout.values()), sum(self.update.values()))

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes

    def render(self, assumed_memory: bool = False) -> str:
        """The plan for people; ``assumed_memory``: the device size is a default, not one seen or given."""
        s = self.setting
        size = f"{self.device_bytes / GB:.0f} GB" + (" assumed: no GPU visible" if assumed_memory else "")
        where = (f"per GPU ({s['world']} x {size}" if s["device"] == "cuda" else
                 f"per process (CPU, {s['world']} process(es) on {self.device_bytes / GB:.0f} GB of RAM")
        lines = [f"memory plan, {where}, {s['mode']}):",
                 f"  model {s['model']}: {s['params'] / 1e6:,.1f}M parameters, {s['trainable'] / 1e6:,.2f}M trainable"
                 f"{' (LoRA r=%d)' % s['lora_rank'] if s['lora_rank'] else ''}",
                 f"  shapes: B={s['B']} prompts/rank, G={s['G']}, P={s['P']} prompt tokens, T={s['T']} new tokens, "
                 f"micro-batch {s['micro']} prompt(s) (L={s['L']} packed positions each), compute {s['compute']}, "
                 f"checkpointing {'on' if s['checkpointing'] else 'off'}, offload {'on' if s['offload'] else 'off'}"]
        for title, part in (("held for the whole run", self.persistent), ("rollout (sampling)", self.rollout),
                            ("update (one micro-batch)", self.update)):
            lines.append(f"  {title}:")
            lines += [f"    {name:<42} {value / GB:8.2f} GB" for name, value in part.items()]
        lines.append(f"    {'CUDA context, workspaces':<42} {self.overhead / GB:8.2f} GB")
        lines.append(f"  peak: {self.peak / GB:.2f} GB of {self.device_bytes / GB:.0f} GB")
        if self.fits:
            lines.append(f"  fits with {(self.device_bytes - self.peak) / GB:.1f} GB free")
        else:
            lines.append(f"  does not fit: need {self.peak / GB:.1f} GB; options: " + "; ".join(self.options()))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def options(self) -> list[str]:
        s, opts = self.setting, []
        if not s["lora_rank"]:
            opts.append("lora.enabled=true (trains adapters only; no reference copy)")
        if not s["checkpointing"]:
            opts.append("distribution.activation_checkpointing=true")
        if s["micro"] > 1:
            opts.append("algorithm.micro_batch_prompts=1")
        if s["fsdp"] and not s["offload"]:
            opts.append("distribution.cpu_offload=true")
        if s["fsdp"]:
            opts.append("more GPUs (FSDP2 shards weights, gradients and optimizer state)")
        elif not s["lora_rank"]:
            opts.append("several GPUs with distribution.fsdp=auto (FSDP2 shards the state)")
        if s["T"] > 128:
            opts.append("a smaller rollout.max_new_tokens")
        opts.append("a GPU with more memory")
        return opts


# --------------------------------------------------------------------------- the model on the meta device


def architecture_config(arch: dict):
    """The transformers config of an architecture file's dict: Qwen2-Audio's (text_config,
    audio_config, audio_token_id) or, with model_type qwen2_5_omni_thinker, the thinker's."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2AudioConfig

    if arch.get("model_type") == "qwen2_5_omni_thinker":
        return Qwen2_5OmniThinkerConfig(**{k: v for k, v in arch.items() if k != "model_type"})
    return Qwen2AudioConfig(audio_config=arch["audio_config"], text_config=arch["text_config"],
                            audio_token_index=arch["audio_token_id"])


def model_config(cfg: Config):
    """(model config, description, audio window in seconds) without loading weights."""
    from transformers import AutoConfig

    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        config = getattr(config, "thinker_config", config)  # the whole Qwen2.5-Omni: its thinker is loaded
        window = 30.0
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            window = float(json.loads(pre.read_text()).get("chunk_length", 30))
        return config, str(path), window
    m = cfg.model
    if m.build_tiny:
        from models import omni
        from models.tiny import tiny_config

        sizes = dict(text_hidden=m.tiny_text_hidden, text_layers=m.tiny_text_layers,
                     audio_hidden=m.tiny_audio_hidden, audio_layers=m.tiny_audio_layers, audio_frames=300)
        if m.tiny_family == "qwen2_5_omni":
            ids = {t: 498 + i for i, t in enumerate(omni.CONTROL_TOKENS)}
            config = omni.tiny_config(vocab_size=512, ids=ids, **sizes)
        else:
            config = tiny_config(vocab_size=512, audio_token_id=511, bos_id=506, eos_id=508, **sizes)
        return config, f"the tiny {m.tiny_family} model (built at start)", 3.0
    arch_file = Path(m.architecture) if m.architecture else ARCH_7B
    if not arch_file.is_absolute() and not arch_file.is_file():
        arch_file = ROOT / arch_file
    if not arch_file.is_file():
        raise ConfigError(f"model.architecture {m.architecture}: file not found")
    arch = yaml.safe_load(arch_file.read_text())
    what = "Qwen2-Audio-7B-Instruct's architecture" if not m.architecture else f"the architecture of {m.architecture}"
    return architecture_config(arch), f"{path} not found: {what}", 30.0


def count_parameters(cfg: Config, config) -> dict:
    """Parameter counts of the model the trainer would build, on the meta device."""
    from models.loading import model_class
    from models.lora import apply_lora
    from models.policy import audio_tower, set_trainable, text_decoder

    with torch.device("meta"):
        model = model_class(config)(config)
    if cfg.lora.enabled:
        lo = cfg.lora
        apply_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets)
    else:
        set_trainable(model, audio_encoder=cfg.model.train_audio_encoder, projector=cfg.model.train_projector,
                      decoder=cfg.model.train_decoder)
    params = list(model.named_parameters())
    trainable = [(n, p) for n, p in params if p.requires_grad]
    layer = text_decoder(model).layers[0]
    encoder_trains = any(p.requires_grad for p in audio_tower(model).parameters())
    return {
        "total": sum(p.numel() for _, p in params),
        "trainable": sum(p.numel() for _, p in trainable),
        "adapters": sum(p.numel() for n, p in trainable if n.endswith((".lora_A", ".lora_B"))),
        "layer": sum(p.numel() for p in layer.parameters()),
        "lm_head": model.lm_head.weight.numel(),
        "encoder_trains": encoder_trains,
    }


# --------------------------------------------------------------------------- activations per token


def decoder_layer_bytes(H: int, Hkv: int, I: int, c: int, *, lora_dropout: bool) -> int:
    """Bytes one Qwen2 decoder layer saves for backward, per position, compute dtype of c bytes.

    Two RMSNorms (each saves its input upcast to fp32, and hands its output on), q, k, v,
    rotated q and k, the head-major copies attention takes of q, k, v and gives back of its
    output, the attention output, and the MLP's gate, up, act(gate) and product.
    With LoRA dropout each adapted input is also saved dropped-out, with its mask (7 of them,
    one of width I).
    """
    per = 2 * 4 * H + c * (2 * H + (H + 2 * Hkv) + (H + Hkv) + (2 * H + 2 * Hkv) + H + 4 * I)
    if lora_dropout:
        per += (c + 1) * (6 * H + I)
    return per


def encoder_layer_bytes(Ha: int, Fa: int, c: int) -> int:
    """Bytes one Whisper encoder layer saves per position: two LayerNorms' inputs and outputs,
    q, k, v (head-major), the attention output and its token-major copy, fc1 and its GELU."""
    return c * (4 * Ha + 3 * Ha + 2 * Ha + 2 * Fa)


def encoder_stem_bytes(Ha: int, n_mels: int, c: int, positions: int) -> int:
    """Bytes the encoder saves per position outside its layers: the fp32 mel input (2 frames
    per position), conv1 and its GELU (at 2x the positions), conv2 and the position sum,
    the pooling and the final norm's input; plus the [S, S] attention mask (per position: S)."""
    return 2 * n_mels * 4 + c * (4 * Ha + 2 * Ha + 2 * Ha) + positions * c


# --------------------------------------------------------------------------- the plan


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Layout:
    """What the trainer decides before anything loads: where the weights live and in which
    dtype, and the shapes of one step on one rank."""

    fsdp: bool
    compute: torch.dtype
    c: int  # bytes of the compute dtype
    stored: int  # bytes per stored weight: FSDP2 keeps fp32 masters
    offload: bool
    shard: int  # ranks the weights are sharded over (1: none)
    on_gpu: float  # 1.0, or 0.0 when cpu_offload keeps the state in host memory
    train_bytes: int  # the trainable parameters as stored (LoRA adapters in fp32)
    window: float  # seconds of audio the encoder takes
    clip: float  # seconds of the longest clip the encoder runs over
    audio_tokens: int
    B: int
    G: int
    P: int
    T: int
    micro: int
    L: int


def plan_layout(cfg: Config, n: dict, window: float, *, world_size: int, device_type: str,
                prompt_tokens: int | None, completion_tokens: int | None, audio_seconds: float | None) -> Layout:
    """The placement (as grpo.setup.use_fsdp and load_policy_model decide it) and the shapes."""
    d = cfg.distribution
    fsdp = d.fsdp == "always" or (d.fsdp == "auto" and (world_size > 1 or device_type == "cuda"))
    # models.loading.resolve_dtype, without importing the model code (the plan must start in seconds)
    auto = torch.bfloat16 if torch.device(device_type).type == "cuda" else torch.float32
    compute = auto if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    c = _bytes(compute)
    stored = 4 if fsdp else c  # FSDP2 keeps fp32 masters
    offload = fsdp and d.cpu_offload
    train_bytes = n["adapters"] * 4 + (n["trainable"] - n["adapters"]) * stored  # adapters are fp32

    B = cfg.rollout.prompts_per_step // world_size
    G = cfg.rollout.group_size
    audio_tokens = int(window * 25)  # 25 decoder positions per second of audio (after pooling)
    # the encoder runs over the longest clip's frames (model.audio_real_frames), else the whole window
    clip = min(audio_seconds or window, window) if cfg.model.audio_real_frames else window
    P = prompt_tokens if prompt_tokens is not None else audio_tokens + TEXT_TOKENS
    T = completion_tokens if completion_tokens is not None else cfg.rollout.max_new_tokens
    micro = min(cfg.algorithm.micro_batch_prompts, B)
    L = P + G * T if cfg.model.shared_prefix else G * (P + T)
    return Layout(fsdp=fsdp, compute=compute, c=c, stored=stored, offload=offload,
                  shard=world_size if fsdp else 1, on_gpu=0.0 if offload else 1.0, train_bytes=train_bytes,
                  window=window, clip=clip, audio_tokens=audio_tokens, B=B, G=G, P=P, T=T, micro=micro, L=L)


def persistent_bytes(cfg: Config, n: dict, x: Layout) -> dict:
    """What the run holds from start to end: the policy's weights, AdamW's state, the reference."""
    frozen = n["total"] - n["trainable"]
    persistent = {
        "weights (policy)": x.on_gpu * (frozen * x.stored + x.train_bytes) / x.shard,
        "optimizer state (AdamW: 2 per trainable)": x.on_gpu * 2 * x.train_bytes / x.shard,
    }
    if reference_kind(cfg) == "copy":
        persistent["reference copy"] = x.on_gpu * n["total"] * x.stored / x.shard
    else:
        persistent["reference copy"] = 0.0
    return persistent


def rollout_bytes(cfg: Config, config, n: dict, x: Layout) -> dict:
    """What sampling holds besides: the gathered weights, the KV cache, one step's logits, the prompts."""
    text, audio = config.text_config, config.audio_config
    Hkv = text.hidden_size // text.num_attention_heads * text.num_key_value_heads
    rows = min(cfg.rollout.generation_batch_prompts, x.B) * x.G
    top_p = cfg.rollout.top_p < 1.0
    return {
        "gathered weights (compute dtype)": n["total"] * x.c if x.fsdp else 0.0,
        "KV cache": 2 * text.num_hidden_layers * rows * (x.P + x.T) * Hkv * x.c,
        "logits of a decoding step": rows * text.vocab_size * (4 * 3 + (12 if top_p else 0)),
        "prompt batch (mel features)": x.B * audio.num_mel_bins * int(x.window * 100) * 4,
    }


def update_bytes(cfg: Config, config, n: dict, x: Layout) -> dict:
    """What the update holds besides: gradients, one micro-batch's activations (decoder, audio
    encoder when it trains), the log-softmax chunk, FSDP's unsharded units."""
    text, audio = config.text_config, config.audio_config
    H, I, V, layers = text.hidden_size, text.intermediate_size, text.vocab_size, text.num_hidden_layers
    Hkv = H // text.num_attention_heads * text.num_key_value_heads
    c, micro, L, G, T = x.c, x.micro, x.L, x.G, x.T
    ckpt = cfg.distribution.activation_checkpointing
    layer = decoder_layer_bytes(H, Hkv, I, c, lora_dropout=cfg.lora.enabled and cfg.lora.dropout > 0)
    tokens = micro * L
    if ckpt:
        decoder = tokens * (layers * H * c + layer)  # each layer's input, and one layer recomputed
    else:
        decoder = tokens * layers * layer
    # outside the layers: the final norm's input and output, the hidden states gathered at the
    # completion positions, the [L, L] block mask
    decoder += tokens * 2 * H * c + micro * G * T * H * c + micro * L * L * c
    features = x.B * audio.num_mel_bins * int(x.window * 100) * 4  # the step's prompt batch: fp32 mel frames
    update = {"gradients": x.on_gpu * x.train_bytes / x.shard, "decoder activations": decoder,
              "prompt batch (mel features)": features}
    if n["encoder_trains"]:
        Ha, Fa = audio.d_model, audio.encoder_ffn_dim
        positions = micro * int(x.clip * 50)  # encoder positions: 50 per second, before the 2x pooling
        per = encoder_layer_bytes(Ha, Fa, c)
        stem = positions * encoder_stem_bytes(Ha, audio.num_mel_bins, c, positions // micro)
        update["audio encoder activations"] = stem + positions * ((audio.encoder_layers * Ha * c + per) if ckpt
                                                                  else audio.encoder_layers * per)
    chunk = min(cfg.model.logprob_chunk_rows, micro * G * T)
    # logits, fp32 log-probs, the entropy's exp and product (no grad), the log-probs' gradient, the logits'
    update["log-softmax chunk (fwd + bwd)"] = chunk * V * (c + 4 + 4 + 4 + 4 + c)
    if x.fsdp and cfg.distribution.reshard_after_forward:  # this unit and the next one's prefetch
        update["FSDP unsharded units"] = 2 * max(n["layer"], n["lm_head"]) * c
    elif x.fsdp:  # the policy's units stay gathered from their forward to their backward (the
        # reference reshards after each forward whatever the setting: models.distributed.shard_model)
        update["FSDP units kept gathered (reshard_after_forward=false)"] = n["total"] * c
    return update


def plan_notes(cfg: Config, n: dict, x: Layout, described: str, prompt_tokens: int | None) -> list[str]:
    """What the plan assumed, in words."""
    notes = []
    if not (Path(cfg.model.path) / "config.json").is_file():
        notes.append(f"model: {described}")
    if prompt_tokens is None:
        notes.append(f"P assumes a clip filling the {x.window:g} s audio window ({x.audio_tokens} audio tokens) + "
                     f"{TEXT_TOKENS} text tokens; T = rollout.max_new_tokens")
    if x.offload:
        notes.append("cpu_offload: weights, gradients and optimizer state live in host memory "
                     f"({(n['total'] * 4 + 3 * x.train_bytes) / x.shard / GB:.1f} GB per rank)")
    if reference_kind(cfg) == "adapters_off":
        notes.append("reference = the same weights with the adapters off: no copy")
    return notes


def plan_memory(cfg: Config, *, world_size: int = 1, device_type: str = "cuda", gpu_memory_gb: float | None = None,
                prompt_tokens: int | None = None, completion_tokens: int | None = None,
                audio_seconds: float | None = None) -> Plan:
    """The plan of ``cfg`` on ``world_size`` devices of ``device_type`` (``cpu``: as the trainer
    runs on the CPU, for the validation against measured peaks). ``prompt_tokens`` /
    ``completion_tokens`` / ``audio_seconds`` (the longest clip): the shapes to plan for;
    default the worst case (a clip filling the audio window plus TEXT_TOKENS, and max_new_tokens).

    1. the model on the meta device, its parameter counts (``model_config``, ``count_parameters``)
    2. the placement and the shapes (``plan_layout``)
    3. the bytes held for the whole run, while sampling, during the update
       (``persistent_bytes``, ``rollout_bytes``, ``update_bytes``)
    4. what the plan assumed, in words (``plan_notes``)
    """
    config, described, window = model_config(cfg)
    n = count_parameters(cfg, config)
    x = plan_layout(cfg, n, window, world_size=world_size, device_type=device_type, prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens, audio_seconds=audio_seconds)
    persistent = persistent_bytes(cfg, n, x)
    rollout = rollout_bytes(cfg, config, n, x)
    update = update_bytes(cfg, config, n, x)
    notes = plan_notes(cfg, n, x, described, prompt_tokens)

    device_bytes = (gpu_memory_gb or 80.0) * GB
    lora = cfg.lora.enabled
    setting = dict(world=world_size, mode=("FSDP2" if x.fsdp else "one device, no sharding") +
                   (f" over {world_size} ranks" if x.fsdp and world_size > 1 else ""),
                   model=described, params=n["total"], trainable=n["trainable"],
                   lora_rank=cfg.lora.rank if lora else 0, B=x.B, G=x.G, P=x.P, T=x.T, micro=x.micro, L=x.L,
                   compute=str(x.compute).replace("torch.", ""),
                   checkpointing=cfg.distribution.activation_checkpointing, offload=x.offload, fsdp=x.fsdp,
                   device=device_type)
    overhead = CUDA_OVERHEAD_GB * GB if device_type == "cuda" else 0.0
    return Plan(setting, persistent, rollout, update, overhead, device_bytes, notes)


def host_memory_gb() -> float:
    """This machine's RAM (what a CPU run's processes share)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def device_memory_gb(cfg: Config, flag: float | None) -> tuple[float, str]:
    """The memory to plan against: the flag, the config key, the visible GPU's, or 80 GB."""
    if flag:
        return flag, "--gpu-memory-gb"
    if cfg.distribution.gpu_memory_gb:
        return cfg.distribution.gpu_memory_gb, "distribution.gpu_memory_gb"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GB, torch.cuda.get_device_name(0)
    return 80.0, NO_GPU
