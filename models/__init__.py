"""flopwise.models"""

from .mod import MoDBlock, MoDConfig
from .moe import MoE, MoEConfig
from .transformer import KVCache, ModelConfig, ModelOutput, Transformer, mod_pattern

__all__ = ["KVCache", "MoDBlock", "MoDConfig", "MoE", "MoEConfig", "ModelConfig", "ModelOutput", "Transformer",
           "mod_pattern"]
