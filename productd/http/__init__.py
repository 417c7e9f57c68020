"""The edge: the Falcon app, request validation, problem responses, health and gunicorn."""
