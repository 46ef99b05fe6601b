"""The ingest edge: OTLP receivers, span normalisation, attribution, privacy, Kafka publisher.

Imports `schemas` only; never faust and never `pipeline`.
"""
