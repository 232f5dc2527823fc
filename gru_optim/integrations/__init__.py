"""Integrations with training frameworks: Hugging Face (hf), DeepSpeed, PyTorch Lightning."""
