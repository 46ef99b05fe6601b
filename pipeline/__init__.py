"""The stream-processing side, one package per job: `kafka/` (plumbing), `pricing/` (stage 1),
`guardrails/` (stage 2), `export/` (FOCUS files), `gateway/` (what gateways run), `observability/`
(metrics), `cli/` (commands and processes).

Imports nothing here, so `import pipeline.kafka` (as the collector does) loads nothing else.
`collector` imports from this package only `pipeline.kafka` and, for processor mode, the pure pricing core
(`pipeline.pricing` catalog, price and FOCUS mapping).
"""
