"""The rule language's fixed words, which the loader, containment, the configuration and the
sinks all read from here."""

# Falco's priorities, most severe first
PRIORITIES = ("EMERGENCY", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFORMATIONAL", "DEBUG")
PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}

# what a rule may ask for besides an alert; carried out by containment
ACTIONS = ("cut_network", "deny_connect", "deny_gpu", "kill", "freeze")
# those that take something from the whole agent, and so fall under the containment rate limit
DISRUPTIVE_ACTIONS = tuple(a for a in ACTIONS if a != "deny_connect")
