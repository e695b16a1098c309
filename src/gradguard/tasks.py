"""Moved to ``gradguard.tools.tasks``; this old path (and ``gradguard.tasks.deep``,
``.digits``, ``.pascanu``) works for one more release."""
from ._moved import alias

alias(__name__, "gradguard.tools.tasks", ("deep", "digits", "pascanu"))
