"""Benchmarks, each with its own config: `trinityx bench train` (`train`), `bench inference` (`inference`),
`bench serve` (`serve`)."""
