"""Integrations with systems outside jitp: the NATS JetStream event sink."""
