"""The device layer: host copies, the CUDA staging streams, and pinning host buffers.

It may import the core (``astage._core``) and the shared top modules, and nothing above it.
"""
