"""The ingest edge: OTLP receivers, span normalisation, attribution, privacy, Kafka publisher.

Imports `schemas`, and `pipeline.kafka` for the one shared producer; never the workers (pricing,
guardrails, export, gateway) nor their metrics.
"""
