"""Moved to ``gradguard.tools.replay``; this old path works for one more release."""
from ._moved import alias

alias(__name__, "gradguard.tools.replay")
