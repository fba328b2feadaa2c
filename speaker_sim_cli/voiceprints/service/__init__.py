"""The voiceprint login service: an HTTP API (FastAPI on uvicorn) and a browser page that record,
enrol, verify and identify speakers against one voiceprint library (the ``server`` extra).

``config`` (the settings, safe by default), ``errors`` (JSON errors with stable codes),
``auth`` (API keys), ``limits`` (body cap, rate limit, in-flight cap), ``uploads`` (decoding an
upload, speech detection), ``batching`` (the micro-batcher), ``engine`` (the library and the
model behind the endpoints), ``app`` (the routes), ``run`` (start-up and graceful shutdown).
"""
