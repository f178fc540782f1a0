"""Berth: a Kubernetes-native LLM inference operator.

Import packages: ``berth.operator`` (control plane, never imports torch), ``berth.runtime``
(engine, model server, node agent) and ``berth.kernels`` (Triton kernels). This module stays
dependency-free so that every part, including the GPU machine's bare Python, can import it.
"""

__version__ = "0.1.0"
