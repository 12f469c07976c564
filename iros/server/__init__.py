"""The HTTP server's edge: the connection protocol uvicorn runs (timeouts, head size, connections per
address) and the guard every request passes before routing (headers, body size, one Authorization, and
in open mode the Host and Origin)."""
