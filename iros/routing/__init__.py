"""Which deployment answers: the router (model, group or auto), model selection from live measurements,
circuit breakers, and the one retry and failover loop."""
