"""The benchmarks behind `iros bench ...`. Above the product: only the CLI's bench commands import it."""
