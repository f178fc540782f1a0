"""The model server of a Berth pod: an OpenAI-compatible API, Prometheus metrics, admission
control and graceful drain around one engine (``berth.runtime.engine``).

Entry points: ``berth serve`` (:mod:`.cli`), :func:`.app.create_app` for an in-process ASGI
app, and :func:`.demo.run_demo` for ``make demo``.
"""
