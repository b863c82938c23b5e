"""Per-user state: what the engine keeps in its RocksDB-backed Faust table, behind a narrow interface.

``user.py`` holds the value (rolling window of event records, model hidden state, emission and churn
bookkeeping) and its compact binary codec; ``table.py`` declares the Faust table that stores it.
"""
