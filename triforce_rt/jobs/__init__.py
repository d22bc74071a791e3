"""The jobs users run: summarize.py (long documents) and batch.py (JSONL in, durable JSONL out)."""
