"""The embedded time-series store: SQLite, raw chunks and sketch rollups (db), their bytes (encoding),
step windows read back from them (query)."""
