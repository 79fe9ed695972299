"""The fleet's activity log: each sidecar ships its decisions (with their traces) to a
collector, which writes them into one activity log that the admin script and the portal read
as they read a pod's rules.db.

    _format.py     the wire format (a gzip'd JSON batch of records) and its bounds, both sides
    _shipper.py    the sidecar's side: a buffer bounded in bytes, filled by the activity writer,
                   POSTed by a background task, retried with backoff (``--decision-log-url``)
    _otlp.py       the same records as OpenTelemetry log records over OTLP (``--decision-log-otlp``)
    _collector.py  the collector's HTTP server (``safous-admin collect``): authenticated,
                   bounded, de-duplicating, writing only the activity log and its traces

Exceptions::

    ValueError
     └── MalformedBatch   a batch that is not one a sidecar sends (the collector answers 400)
"""

from ._collector import PATH, Collector, Limits
from ._format import FORMAT, MAX_BATCH_RECORDS, POD_NAME, MalformedBatch, batch_body, encode_record, read_batch
from ._otlp import OtlpDecisionLogs, otlp_logs_endpoint
from ._shipper import DecisionShipper

__all__ = [
    "FORMAT",
    "MAX_BATCH_RECORDS",
    "PATH",
    "POD_NAME",
    "Collector",
    "DecisionShipper",
    "Limits",
    "MalformedBatch",
    "OtlpDecisionLogs",
    "batch_body",
    "encode_record",
    "otlp_logs_endpoint",
    "read_batch",
]
