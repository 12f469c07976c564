"""Live state shared by every worker of every replica: documents (live settings, rules), bounded logs
(alert events, the metrics frames), leases with fencing tokens (the one evaluator) and token buckets
(rate limits). `local` keeps one host's workers in step through the data directory, `redis` a cluster."""
