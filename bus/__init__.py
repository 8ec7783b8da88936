"""bus: the only package that imports nats."""
