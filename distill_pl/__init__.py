"""distill_pl: step distillation of video diffusion models with PyTorch Lightning."""

__version__ = "0.1.0"
