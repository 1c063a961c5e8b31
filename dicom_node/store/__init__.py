"""Durable storage: the spool of received files and the job table that indexes them."""
