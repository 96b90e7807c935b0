"""Loading real weights: Self-Forcing / original-Wan checkpoints and diffusers-format Wan2.1 folders.

Key conversion uses diffusers' own converter (`convert_wan_transformer_to_diffusers`); our code only unwraps the
training-checkpoint layout and fails loudly, naming keys, when a checkpoint does not fit the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import WeightsError
from .presets import TransformerConfig, VAEConfig

logger = logging.getLogger(__name__)

__all__ = [
    "WanFolder",
    "check_diffusers_folder",
    "check_state_dict",
    "extract_generator_state",
    "is_original_wan_keys",
    "load_checkpoint_into",
    "load_diffusers_folder",
    "load_diffusers_transformer",
    "load_diffusers_vae",
    "load_module_weights",
    "load_transformer_weights",
    "read_diffusers_transformer_state",
    "read_state_dict",
    "to_diffusers_transformer_keys",
    "to_dtype_keeping_fp32",
    "transformer_config_from_folder",
    "vae_config_from_folder",
]

# Wrapper fragments that FSDP, activation checkpointing and torch.compile insert into parameter names.
_WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# Prefixes stripped when every key carries them (DDP `module.`, Self-Forcing's wrapper `model.`, ComfyUI's
# `model.diffusion_model.`).
_COMMON_PREFIXES = ("module.", "model.", "diffusion_model.")
# Keys some exporters include that carry no learned weights (RoPE tables are recomputed by the model).
_HARMLESS_EXTRA_SUFFIXES = ("rope.freqs_cos", "rope.freqs_sin", "rope.freqs")
_HARMLESS_EXTRA_KEYS = ("freqs",)
# Keys that exist only in original-Wan naming (diffusers renames all of them).
_ORIGINAL_MARKERS = ("head.head.weight", "head.modulation", "text_embedding.0.weight", "time_embedding.0.weight")
_SHOW = 10  # keys listed per category in an error


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a .safetensors or torch (.pt/.pth/.bin/.ckpt) file onto the CPU; torch files load with
    weights_only=True (no arbitrary code from downloaded pickles). Nested dicts (training checkpoints) are
    returned as stored."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightsError(f"cannot read safetensors file {p}: {e}") from e
    try:
        try:  # mmap avoids a second in-RAM copy of multi-GB training checkpoints
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be mmapped
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(
            f"{p} holds pickled objects beyond tensors and is refused with weights_only=True; "
            "re-save its state dict (torch.save(sd) or safetensors)"
        ) from e
    except Exception as e:
        raise WeightsError(f"cannot read {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{p} does not hold a dict of tensors (found {type(obj).__name__})")
    return dict(obj)


def _strip_common_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in _COMMON_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def extract_generator_state(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The generator's weights from a Self-Forcing style checkpoint ('generator_ema' preferred over 'generator'),
    or a plain state dict; wrapper fragments and common prefixes are stripped."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"expected a dict of weights, got {type(obj).__name__}")
    sd: Mapping[str, Any] = obj
    for key in ("generator_ema", "generator"):
        sub = obj.get(key)
        if isinstance(sub, Mapping) and sub:
            if key == "generator" and "generator_ema" in obj:
                logger.warning("checkpoint's generator_ema is empty; using 'generator'")
            sd = sub
            logger.info("using checkpoint entry %r (%d tensors)", key, len(sub))
            break
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        top = ", ".join(list(map(str, obj))[:_SHOW])
        raise WeightsError(f"no generator weights found: expected 'generator_ema', 'generator' or tensors; keys: {top}")
    if len(tensors) < len(sd):
        logger.info("ignoring %d non-tensor entries in the checkpoint", len(sd) - len(tensors))
    out = {}
    for k, v in tensors.items():
        for frag in _WRAPPER_FRAGMENTS:
            k = k.replace(frag, "")
        out[k] = v
    return _strip_common_prefixes(out)


def is_original_wan_keys(sd: Mapping[str, Any]) -> bool:
    """True for original Wan naming ('blocks.0.self_attn.q.weight', 'head.head.weight', ...)."""
    if any(m in sd for m in _ORIGINAL_MARKERS):
        return True
    return any(".self_attn." in k or ".cross_attn." in k for k in sd)


def to_diffusers_transformer_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-Wan key names -> diffusers `WanTransformer3DModel` names via diffusers' converter;
    diffusers-named dicts pass through unchanged."""
    if not is_original_wan_keys(sd):
        return dict(sd)
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers(dict(sd))  # it pops from its argument: give it a copy


def _is_harmless_extra(key: str) -> bool:
    return key in _HARMLESS_EXTRA_KEYS or key.endswith(_HARMLESS_EXTRA_SUFFIXES)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def check_state_dict(
    model: nn.Module | Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], what: str = "model"
) -> None:
    """Raise one WeightsError naming missing, unexpected and mis-shaped keys (first 10 of each, with counts).

    Works on `meta` models and tensors (only names and shapes are read). `what` names the module in the message."""
    expected = model.state_dict() if isinstance(model, nn.Module) else model
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected and not _is_harmless_extra(k))
    misshaped = sorted(
        f"{k} (checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped: {_listing(misshaped)}")
    if problems:
        raise WeightsError(f"checkpoint does not fit the {what} ({len(expected)} tensors): " + "; ".join(problems))


def load_module_weights(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Strictly load a state dict into any module (values are cast to each parameter's dtype/device)."""
    check_state_dict(module, sd, what)
    module.load_state_dict({k: v for k, v in sd.items() if not _is_harmless_extra(k)}, strict=True)


def load_transformer_weights(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Strictly load a diffusers-named transformer state dict (convert original names first)."""
    load_module_weights(model, sd, "transformer")


def read_diffusers_transformer_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """State dict of a diffusers `transformer/` folder (or the folder above it), single-file or sharded."""
    root = Path(model_dir)
    folder = root / "transformer" if (root / "transformer").is_dir() else root
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(read_state_dict(folder / shard))
            return sd
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise WeightsError(f"no diffusers transformer weights (diffusion_pytorch_model.*) in {folder}")


def load_checkpoint_into(model: nn.Module, path: str | Path) -> None:
    """Read a checkpoint file (or a diffusers folder), unwrap, convert key names and strictly load it."""
    p = Path(path)
    if p.is_dir():
        sd = read_diffusers_transformer_state(p)
    else:
        sd = extract_generator_state(read_state_dict(p))
    converted = is_original_wan_keys(sd)
    load_transformer_weights(model, to_diffusers_transformer_keys(sd))
    logger.info("loaded %d tensors from %s%s", len(sd), p, " (converted from original Wan names)" if converted else "")


# ----------------------------------------------------------------------------------------- diffusers folders


def _read_config(model_dir: str | Path, sub: str) -> dict[str, Any]:
    path = Path(model_dir) / sub / "config.json"
    if not path.is_file():
        raise WeightsError(f"missing {path} (expected a diffusers-format Wan2.1 folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e


def _fill(cls, cfg: dict[str, Any], tuples: tuple[str, ...]):
    kw = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg}
    for k in tuples:
        if k in kw:
            kw[k] = tuple(kw[k])
    return cls(**kw)


def transformer_config_from_folder(model_dir: str | Path) -> TransformerConfig:
    """The transformer's real shape from `transformer/config.json` (T2V Wan only)."""
    cfg = _read_config(model_dir, "transformer")
    if cfg.get("image_dim") or cfg.get("added_kv_proj_dim"):
        raise WeightsError(f"{Path(model_dir) / 'transformer'} is an image-to-video Wan model; only T2V is supported")
    return _fill(TransformerConfig, cfg, ("patch_size",))


def vae_config_from_folder(model_dir: str | Path) -> VAEConfig:
    """The VAE's real shape and latent statistics from `vae/config.json`; strides follow from the shape."""
    cfg = _read_config(model_dir, "vae")
    vae = _fill(VAEConfig, cfg, ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"))
    return dataclasses.replace(
        vae,
        spatial_stride=2 ** (len(vae.dim_mult) - 1),
        temporal_stride=2 ** sum(bool(t) for t in vae.temperal_downsample),
    )


def check_diffusers_folder(model_dir: str | Path, parts: tuple[str, ...] = ("transformer", "vae")) -> Path:
    """Fail early, naming the path, when the folder or one of its parts is missing."""
    root = Path(model_dir)
    if not root.is_dir():
        raise WeightsError(f"model folder not found: {root}")
    for part in parts:
        if not (root / part).is_dir():
            raise WeightsError(f"missing folder {root / part} (expected a diffusers-format Wan2.1 folder)")
        if not (root / part / "config.json").is_file():
            raise WeightsError(f"missing {root / part / 'config.json'}")
    return root


def _from_pretrained(cls, model_dir: Path, sub: str, device, dtype):
    try:
        model = cls.from_pretrained(str(model_dir), subfolder=sub, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"cannot load {model_dir / sub}: {first}") from e
    return model.to(device).eval().requires_grad_(False)


def _accelerate_available() -> bool:
    from diffusers.utils import is_accelerate_available

    return is_accelerate_available()


def to_dtype_keeping_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast to `dtype` except the submodules the class lists in `_keep_in_fp32_modules` (diffusers' rule, e.g.
    Wan's time embedder, modulation tables and RoPE tables), each tensor cast once from float32 (no lossy
    round trip)."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def load_diffusers_transformer(
    model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """`WanTransformer3DModel` from `model_dir/transformer` (offline), parameters in `dtype` except diffusers'
    keep-in-fp32 modules. diffusers' `from_pretrained` needs `accelerate` for this class; without it the model is
    built from its config and loaded with our strict loader (same result, more memory while loading)."""
    from diffusers import WanTransformer3DModel

    root = check_diffusers_folder(model_dir, ("transformer",))
    if _accelerate_available():
        return _from_pretrained(WanTransformer3DModel, root, "transformer", device, dtype)
    logger.info("accelerate not installed: building the transformer from its config (pip install accelerate "
                "for faster, lower-memory loading)")
    with torch.random.fork_rng(devices=[]):  # the throwaway random init must not move the global RNG
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(root / "transformer"))
    load_transformer_weights(model, read_diffusers_transformer_state(root))
    return to_dtype_keeping_fp32(model, dtype).to(device).eval().requires_grad_(False)


def load_diffusers_vae(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`AutoencoderKLWan` from `model_dir/vae` (offline). Keep it float32, as diffusers' Wan pipelines do."""
    from diffusers import AutoencoderKLWan

    root = check_diffusers_folder(model_dir, ("vae",))
    return _from_pretrained(AutoencoderKLWan, root, "vae", device, dtype)


@dataclasses.dataclass
class WanFolder:
    """What a diffusers-format Wan2.1 folder provides (the text encoder is built by `text.build_text_encoder`)."""

    transformer: nn.Module
    vae: nn.Module
    transformer_config: TransformerConfig
    vae_config: VAEConfig


def load_diffusers_folder(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
) -> WanFolder:
    """Transformer (in `dtype`) and VAE (in `vae_dtype`) of a diffusers Wan2.1 folder, with their configs."""
    root = check_diffusers_folder(model_dir, ("transformer", "vae"))
    return WanFolder(
        transformer=load_diffusers_transformer(root, device, dtype),
        vae=load_diffusers_vae(root, device, vae_dtype),
        transformer_config=transformer_config_from_folder(root),
        vae_config=vae_config_from_folder(root),
    )
