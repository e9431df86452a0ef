"""flowblend.serve: the HTTP video API over a warm pipeline (`flowblend serve`), and the same app on Ray Serve.

config.py (ServeConfig), video_request.py (request schema and checks), warm.py (the warm pipeline),
jobs.py (job records on the results dir), service.py (queue and worker), metrics.py (Prometheus),
app.py (FastAPI routes), server.py (uvicorn with a drain), ray_app.py (Ray Serve deployment).
"""
