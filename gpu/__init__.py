"""trnft.gpu: the GPU platform: the FSDP2 trainer on Lightning (trnft.common.fsdp) on CUDA with NCCL (gloo on CPU).

flash_attn and vllm are imported lazily inside the functions that need them.
"""
