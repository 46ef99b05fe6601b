"""The stream-processing side: faust workers, embedded broker, topics, CLI and the all-in-one runtime.

May import `schemas` and `collector`; `collector` never imports this package.
"""
