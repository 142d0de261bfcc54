"""The device layer: host copies, the device backends (one interface, ``_backend``; the generic
``torch.accelerator`` backend, ``_generic``; what CUDA specialises, ``_cuda``), and pinning.

It may import the core (``astage._core``) and the shared top modules, and nothing above it.
"""
