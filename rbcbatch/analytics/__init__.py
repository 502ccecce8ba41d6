"""DuckDB over a run's Parquet: slide and patient views, grades, screening flags with their
evidence, and dataset shift between sites."""

from rbcbatch.analytics.views import WILSON_MACROS, ScreeningRules, connect, query, wilson_interval

__all__ = ["WILSON_MACROS", "ScreeningRules", "connect", "query", "wilson_interval"]
