"""trnft.gpu: the GPU path: FSDP2 and tensor parallelism over torch.distributed (NCCL on GPUs, gloo on CPU).

flash_attn and vllm are imported lazily inside the functions that need them.
"""
