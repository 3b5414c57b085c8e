"""Tensor files without torch (safetensors, torch.save zip, streaming writers) and the HF side files."""
