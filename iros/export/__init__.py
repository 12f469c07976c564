"""Exports for a Prometheus and Grafana stack: PromQL for KPIs and conditions, alerting rules, a Grafana
dashboard."""
