"""The request path of the model API (/v1/chat/completions, /v1/completions, /v1/embeddings): auth and
keys, rate limits, the pipeline, single-flight and the streamed answer's relay."""
