"""Traffic tools around the worker, apart from its pipeline (stream/ holds ingest -> state -> batch -> score -> emit):
the simulator with its ground truth, the real-trace adapter (REES46), the replay producer, malformed records for the
dead-letter path, and the demo that ties a broker, a worker and replayed traffic together."""
