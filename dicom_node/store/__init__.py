"""Durable storage: the spool of received files and the job table that indexes them, and what works on them.

The stages talk to each other only through this package: the job table and its queues (``queue``), the spool
(``spool``, ``fsync``), the audit log (``audit``), process leases (``lease``), retention, the login throttle
(``throttle``), and two in-process helpers of the queues' consumers: ``doorbell`` (wake a stage when work is
queued) and ``periodic`` (housekeeping sweeps).
"""
