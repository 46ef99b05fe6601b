"""Kafka plumbing, written once: the embedded broker, topic creation, one producer and one consumer factory.

Shared by the collector and the workers. Knows topics, partitions, offsets and connection
settings, never what a message means: it imports no domain module (pricing, guardrails,
export, gateway, observability, cli) and nothing of the collector.
"""
