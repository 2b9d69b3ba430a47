"""Files: atomic writes and checked reads, our checkpoints, sharded checkpoints, Hugging Face folders.

Importing this package registers the two checkpoint formats that `Transformer.save_pretrained`,
`from_pretrained` and `from_hf` use (moe.model.CHECKPOINT_FORMATS); `import moe` does it.
"""

from __future__ import annotations

from ..model import CHECKPOINT_FORMATS, CheckpointFormat
from .checkpoint import load_pretrained, save_pretrained
from .hf import load_hf, save_hf

CHECKPOINT_FORMATS["moe"] = CheckpointFormat(save_pretrained, load_pretrained)
CHECKPOINT_FORMATS["hf"] = CheckpointFormat(save_hf, load_hf)

__all__ = ["load_hf", "load_pretrained", "save_hf", "save_pretrained"]
