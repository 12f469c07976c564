"""The request path of /v1/chat/completions: auth and keys, rate limits, the pipeline, single-flight and
the streamed answer's relay."""
