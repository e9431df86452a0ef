"""flowblend.serve: the HTTP video API over a warm pipeline (`flowblend serve`), and the same app on Ray Serve.

config.py (ServeConfig), video_request.py (request schema and checks), intake.py (JSON and form bodies),
video_object.py (a job as OpenAI's video object), warm.py (the warm pipeline), jobs.py (job records on the
results dir), shared_queue.py (the queue servers share), worker.py (the worker thread), results.py (a job's
files), service.py (life cycle and requests), guard.py (Host, key, body cap), metrics.py (Prometheus), app.py
(FastAPI routes), page.html (the page at /), server.py (uvicorn with a drain), ray_app.py (Ray Serve deployment).
"""
