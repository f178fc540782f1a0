"""The model server of a Berth pod: an OpenAI-compatible API, Prometheus metrics, admission
control and graceful drain around one engine (``berth.runtime.engine``), which runs in a
process of its own (:mod:`.engine_process`) so that HTTP work and the engine's host work do
not share a GIL.

Entry points: ``berth serve`` (:mod:`.cli`), :func:`.app.create_app` for an in-process ASGI
app, and :func:`.demo.run_demo` for ``make demo``.
"""
