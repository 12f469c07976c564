"""The response cache: its engine (exact and semantic lookup), what it makes of a request (plan), replay,
the embedder, the vector index, the verifier and the stores; its seams are in base.py."""
