"""Integrations with tools outside prunequant (optional extras, each imported lazily by its
own module): experiment tracking, other runtimes, pipeline frameworks."""
