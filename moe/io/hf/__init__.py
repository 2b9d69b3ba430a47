"""Hugging Face checkpoints: load Mixtral, Qwen3-MoE, DeepSeek-V3 and Ling 2.0 model folders into
`moe.Transformer`, and export a `Transformer` as one of them.

    model = moe.Transformer.from_hf("Qwen3-30B-A3B", dtype=torch.bfloat16)   # = load_hf(...)
    model.save_pretrained("out", format="hf")                                # = save_hf(model, "out")

Loading reads config.json and checks it whole before anything is built (every key's type and
bounds; a key it omits takes the family's own default: transformers' configuration class, the
authors' for Ling 2.0), maps every checkpoint tensor by name and shape (refusing, with the
names, any that are missing, unexpected or misshapen), builds the model on the meta device and
fills each tensor straight from the safetensors files: no second copy of the weights, and
never a pickle. Export writes the per-expert tensor names the published checkpoints use, so
that tools written for those read it too (the parity tests load it in transformers 4.57 and 5.23).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from ...config import ModelConfig
from ...errors import InputError
from ...layer import MoE
from ...model import Transformer
from ...rope import Rotary
from . import reader, writer
from .bailing_moe_v2 import BailingMoeV2
from .config_keys import check_key
from .deepseek_v3 import DeepseekV3
from .mixtral import Mixtral
from .qwen3_moe import Qwen3Moe
from .spec import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (Mixtral(), Qwen3Moe(), DeepseekV3(), BailingMoeV2())}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["FAMILIES", "family_of", "hf_config", "load_hf", "save_hf"]


def family_of(hf: dict) -> Family:
    """The family of a config.json. Ling 2.0 is published as model_type "bailing_moe" (Ling 1.0's
    name) with architectures ["BailingMoeV2ForCausalLM"]."""
    for key in ("model_type", "architectures", "torch_dtype", "dtype"):  # the keys read before any family's
        check_key(key, hf.get(key))
    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    if model_type == BailingMoeV2.published_model_type and BailingMoeV2.architecture in architectures:
        return FAMILIES[BailingMoeV2.model_type]
    if model_type not in FAMILIES:
        raise InputError(
            f"unsupported model_type {str(model_type)[:80]!r} (architectures {str(architectures)[:200]}); "
            f"supported: {', '.join(FAMILIES)}, and bailing_moe with BailingMoeV2ForCausalLM"
        )
    return FAMILIES[model_type]


def load_hf(
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    progress: bool = False,
) -> Transformer:
    """A Hugging Face model folder -> `Transformer` in eval mode.

    dtype: of the weights (default: the checkpoint's declared dtype, else float32); the routers'
    selection bias and the RoPE frequencies stay float32. backend: the experts backend
    ("eager", "torch", "triton"; default: MoEConfig's). progress: a tqdm bar over the bytes read.
    """
    directory = Path(directory)
    hf = reader.read_config(directory)
    try:  # config.json is checked whole, against its family's own defaults, before anything is built
        family = family_of(hf)
        config = family.to_config(hf, name=_model_name(directory))
        if backend is not None and config.moe is not None:
            config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=backend))
    except InputError as e:
        raise InputError(f"{directory / 'config.json'}: {e}") from None
    entries = reader.scan(directory)
    try:  # where a family's config.json alone is ambiguous (Ling 2.0's MTP layers), the tensors decide
        resolved = family.for_tensors(hf, entries.keys())
        if resolved is not hf:
            hf = resolved
            config = family.to_config(hf, name=_model_name(directory))
            if backend is not None and config.moe is not None:
                config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, backend=backend))
    except InputError as e:
        raise InputError(f"{directory}: {e}") from None
    if config.num_mtp_layers and not _has_layers(entries, family.mtp_layers(hf)):
        # config.json counts MTP modules that the folder does not hold (transformers saves none).
        config = dataclasses.replace(config, num_mtp_layers=0)
    stacked = any(name.endswith(".experts.gate_up_proj") for name in entries)
    pieces = family.pieces(config, stacked)
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    try:
        reader.check(entries, pieces, family.skipped_layers(hf), optional, family.model_type)
    except ValueError as e:  # the folder's tensors do not fit its config.json: bad input
        raise InputError(f"{directory}: {e}") from None

    with torch.device("meta"):
        model = Transformer(config)
    dtype = dtype or _DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"), torch.float32)
    skeleton = model.state_dict(keep_vars=True)
    shapes = {name: t.shape for name, t in skeleton.items()}
    dtypes = {name: torch.float32 if name.endswith("expert_bias") else dtype for name in skeleton}
    tensors = reader.fill(entries, pieces, shapes, dtypes, torch.device(device), progress)
    if config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    _materialize_buffers(model, torch.device(device))
    return model.eval()


def _has_layers(entries: dict, layers: range) -> bool:
    return any(name.startswith(tuple(f"model.layers.{i}." for i in layers)) for name in entries)


def _model_name(directory: Path) -> str:
    """The folder's name as a config name (which names run folders): other characters become '-'."""
    name = re.sub(r"[^\w.+-]", "-", directory.resolve().name).lstrip(".+-")[:128]
    return name or "model"


def _materialize_buffers(model: Transformer, device: torch.device) -> None:
    """Meta construction leaves the non-persistent buffers (RoPE frequencies, MoE load counters)
    and the last-forward loss empty; they hold no learned state, so recompute them."""
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset_buffers(device)
        elif isinstance(module, MoE):
            module.load_since_update = torch.zeros_like(module.load_since_update, device=device)
            module.aux_loss = torch.zeros((), device=device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"load_hf left tensors on the meta device: {', '.join(left)}")


def hf_config(config: ModelConfig, family: str | None = None) -> tuple[Family, dict]:
    """(family, config.json dict) for exporting a model of `config`; the family is the first that
    can express it unless named."""
    if family is not None:
        if family not in FAMILIES:
            raise InputError(f"unknown family {str(family)[:80]!r} (expected one of {', '.join(FAMILIES)})")
        candidates = [FAMILIES[family]]
    else:
        candidates = list(FAMILIES.values())
    reasons = []
    for fam in candidates:
        try:
            body = fam.to_hf(config)
        except InputError as e:
            reasons.append(str(e))
            continue
        model_type = getattr(fam, "published_model_type", fam.model_type)
        return fam, {"architectures": [fam.architecture], "model_type": model_type, **body}
    raise InputError("; ".join(reasons) if family else "no Hugging Face family fits this model: " + "; ".join(reasons))


def save_hf(
    model: Transformer,
    directory: str | Path,
    *,
    family: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = writer.SHARD_BYTES,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Hugging Face folder of `family` (default: the first that fits).

    A folder that holds anything is refused unless `overwrite`; then only the model's files are replaced.

    dtype: of the written weights (default: the model's); selection biases stay float32.
    Refuses a model the family cannot express, naming the setting, and a nonzero selection
    bias the family has no tensor for.
    """
    fam, config = hf_config(model.config, family)
    directory = Path(directory)
    state = model.state_dict()
    dtype = dtype or model.embed_tokens.weight.dtype
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    pieces = fam.pieces(model.config)
    covered = {p.ours for p in pieces}
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    lost = [
        n
        for n, t in state.items()
        if n not in covered and n not in tied and not (n.endswith("expert_bias") and not t.any())
    ]
    if lost:
        raise InputError(
            f"cannot export as {fam.model_type}: it has no tensor for {', '.join(lost)} "
            "(a nonzero router selection bias)"
        )
    dtypes = {
        p.hf: torch.float32 if p.hf.endswith(("expert_bias", "e_score_correction_bias")) else dtype for p in pieces
    }
    writer.write_checkpoint(directory, config, state, pieces, dtypes, max_shard_bytes, progress, overwrite=overwrite)
    return directory
