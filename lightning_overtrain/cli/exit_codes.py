"""The exit statuses of ``lightning-overtrain``, in a module of their own.

Every command imports them from here (not from :mod:`lightning_overtrain.cli.main`,
which imports the commands): no import cycle.
"""

EXIT_OK = 0
#: Some checkpoints failed or were skipped; the others were probed.
EXIT_FAILURES = 1
#: The command line or the set-up cannot work (a missing path, a bad option): nothing ran.
EXIT_USAGE = 2
#: Interrupted (Ctrl-C), as a shell reports it.
EXIT_INTERRUPTED = 130
