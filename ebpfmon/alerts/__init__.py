"""Alerts: verdicts to incidents, incidents to sinks, through an on-disk spool."""
