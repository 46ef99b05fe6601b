"""The command line and the processes it starts: arguments, each role's composition, the all-in-one
runtime (`spendstream run`) and the demo traffic. Parses, wires and supervises; decides nothing.

Each command imports only what it runs (imports are inside the command functions), so
`spendstream collector` never loads pricing, guardrails or the workers' metrics.
"""

from pipeline.cli.main import main

__all__ = ["main"]
