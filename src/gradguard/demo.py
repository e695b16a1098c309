"""Moved to ``gradguard.tools.demo``; this old path works for one more release."""
from ._moved import alias

alias(__name__, "gradguard.tools.demo")
