"""`genai.cost.focus` into FOCUS Parquet files: the exporter consumer, the files (atomic writes, row-id
dedupe, rollups) and `spendstream report` over them. Imports `pricing` only for its meter names;
never `guardrails` or `gateway`.
"""
