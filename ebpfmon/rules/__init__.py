"""Judging: the rule language (conditions, fields, windows, sequences), the loader of rule
packs, the judges generated per event kind, and the engine that runs them."""
