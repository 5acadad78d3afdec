from lightning_peft.models.pretrained import OFFLINE_COPIES, resolve_pretrained

__all__ = ["OFFLINE_COPIES", "resolve_pretrained"]
