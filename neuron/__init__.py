"""trnft.neuron: the Trainium path (optimum-neuron/NxD on Trainium, torch-xla SPMD on CPU).

Neuron SDK imports (torch_neuronx, neuronx_distributed, optimum.neuron training code) stay inside the
functions that need them, so this package imports on any machine.
"""
