"""Tools built on the library, never imported by it: ``demo``, ``diagnose``,
``replay``, ``bench`` (the ``gradguard`` subcommands of those names) and
``tasks`` (the demo's and the benchmarks' models and data).

The core (statistics, clipping, guard, detectors, remedies, run store)
imports nothing from here.
"""
