"""Alerting: rules, the engine that moves alerts through their states, the durable store, notifications
and the channels (channels/) they go out through."""
