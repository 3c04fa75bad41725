"""The service's Lua for Redis, read from the package's ``lua/`` folder: the one place that does.

Two kinds of file live there, each with its contract at the top (``KEYS``, ``ARGV``, what it
returns). ``lua/*.lua`` is the enhanced store's function library, ``lib.lua`` and one file a
script, which :mod:`~enhanced_locking.backends.redis_scripts` assembles and Redis loads once
(``FUNCTION LOAD``). ``lua/standalone/*.lua`` are scripts of their own, each sent by its users
with ``register_script`` (``EVALSHA``, reloaded on ``NOSCRIPT``): they serve keys outside the
store's namespaces (Atlantis's own layout, the events' stream, the audit log, the migration's
replica registry), so they neither need the library's checks nor wait for it to be loaded.

The files are package data (``pyproject.toml``), read through :mod:`importlib.resources`, once:
each user keeps the text in a module constant. ``make lint`` runs ``luacheck`` over both kinds
(``hack/lint_lua.py``).
"""

from __future__ import annotations

from importlib import resources

__all__ = ["STANDALONE", "source", "standalone"]

STANDALONE = "standalone"
"""The folder of the scripts of their own, inside ``lua/``."""


def source(file: str) -> str:
    """The text of ``lua/<file>`` as shipped in the package (``file`` may name a subfolder,
    ``standalone/try_lock.lua``)."""
    return resources.files(__package__).joinpath("lua", file).read_text(encoding="utf-8")


def standalone(name: str) -> str:
    """The text of the script of its own ``lua/standalone/<name>.lua``."""
    return source(f"{STANDALONE}/{name}.lua")
