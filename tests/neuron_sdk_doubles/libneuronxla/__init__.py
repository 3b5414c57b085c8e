"""Test double of libneuronxla 2.2 (Neuron SDK 2.26.1): only its compile-cache module.

It deliberately has no ``libneuronpjrt_path`` submodule, so torch-xla keeps using its CPU PJRT client.
"""
