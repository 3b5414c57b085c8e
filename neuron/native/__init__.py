"""trnft.neuron.native: the ``neuron-native`` platform for Trainium 2 and 3 on native PyTorch (TorchNeuron).

The FSDP2 trainer on Lightning (:mod:`trnft.common.fsdp`) with device and process-group backend
``neuron``; on a machine without a Neuron device the same trainer runs on the CPU over gloo. torch-neuronx
is imported lazily, only when a Neuron device is present.
"""
