"""What people see of the workers: metric declarations, label budgets, consumer lag, the /metrics endpoint.

Declarations only: the collectors that fill per-stage metrics live with their stage. Imports no
stage (pricing, guardrails, export, gateway, cli); the collector declares its own metrics.
"""
