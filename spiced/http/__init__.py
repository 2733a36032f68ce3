"""The HTTP API: Starlette app, auth gates, encoders, and the Hypercorn server bound to the TLS manager."""
