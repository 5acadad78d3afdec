from lightning_peft.models.ast import AudioSpectrogramTransformer, build_hf_ast, build_timm_ast
from lightning_peft.models.pretrained import OFFLINE_COPIES, resolve_pretrained

__all__ = ["OFFLINE_COPIES", "AudioSpectrogramTransformer", "build_hf_ast", "build_timm_ast", "resolve_pretrained"]
