"""Auto-optimization: the live settings (tuning), the rules engine that changes them (optimizer) and the
audit of every change (actionlog)."""
