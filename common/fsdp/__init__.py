"""The FSDP2 + tensor-parallel trainer on Lightning, shared by the ``gpu`` and ``neuron-native`` platforms.

A platform hands the trainer a :class:`~trnft.common.fsdp.platform.DevicePlatform` (device, process-group
backend, compile backend, Lightning accelerator); everything else (sharding, checkpoints, consolidation, the
Lightning module) is the same code on CUDA, native Neuron and the CPU.
"""
