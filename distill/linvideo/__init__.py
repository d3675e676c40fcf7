from athanor.distill.linvideo.method import LinVideo

__all__ = ["LinVideo"]
