"""flopwise.coding"""

from .dataset import BuildOptions, build, compression_stats, decode, load_m1
from .methods import METHODS, ArithmeticCoding, Compressed, EqualInfoAC, GZip, StaticAC
from .models import CachedLM, IncrementalModel, ModuleModel, ProbabilityModel, StaticModel
from .rangecoder import CoderConfig, CorruptStreamError, cdf_from_freqs, quantize_logits, quantize_probs
from .streams import decode_equal_info, decode_streams, encode_equal_info, encode_streams, equal_info_min_freq
from .tokens import bits_to_tokens, tokens_to_bytes

__all__ = [
    "ArithmeticCoding", "BuildOptions", "CachedLM", "IncrementalModel", "CoderConfig", "Compressed", "CorruptStreamError", "EqualInfoAC", "GZip",
    "METHODS", "ModuleModel", "ProbabilityModel", "StaticAC", "StaticModel", "bits_to_tokens", "build",
    "cdf_from_freqs", "compression_stats", "decode", "decode_equal_info", "decode_streams", "encode_equal_info",
    "encode_streams", "equal_info_min_freq", "load_m1", "quantize_logits", "quantize_probs", "tokens_to_bytes",
]
