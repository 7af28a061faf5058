"""User names for uids, as the host's passwd database has them."""

from __future__ import annotations

import pwd


def user_name(uid: int) -> str:
    """The user's name, or the uid as text when the host has no such user."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
