"""Monitoring: the metric catalog, the collector, Prometheus exposition, KPIs, the system sampler, the live
hub, and the history stores (the embedded tsdb/ or a real Prometheus) behind MetricsStore (store.py)."""
