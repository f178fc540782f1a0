"""Berth's node agent (``berth node-agent``): one per node, it arbitrates each GPU's memory
between the runtimes that share it (``berth.agent_protocol``), exports the ledger as metrics and
publishes the node's GPUs to the scheduler. It never imports torch or the engine, so it runs in
the operator's small image.

:mod:`.ledger` is the pure core; :mod:`.server` (HTTP on a unix socket), :mod:`.metrics`,
:mod:`.gpus` (NVML or simulated) and :mod:`.node` (Kubernetes) are thin shells around it.
"""
