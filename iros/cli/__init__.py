"""The `iros` command line."""
