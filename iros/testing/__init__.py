"""What tests and benchmarks start: Iros and its peers as real child processes on real sockets
(Prometheus, Redis, Alertmanager). Above the product: nothing in the product imports it."""
