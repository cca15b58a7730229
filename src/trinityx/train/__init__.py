"""Training: the one loop (`loop.fit`), the experts it trains (`experts`) and the router commands (`router`)."""
