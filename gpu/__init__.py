"""trnft.gpu: the CUDA path (Lightning + FSDP); runs with DDP over gloo or one device on CPU.

flash_attn and vllm are imported lazily inside the functions that need them.
"""
