"""Containment: carrying out what rules ask for, and the quarantine records of it."""
