"""The ``apmpipe`` command line: parse options, build a stage config, call the stage, print a summary.

One module per command (``extract``, ``inspect``: info and verify, ``train``, ``evaluate``: eval and islands,
``embed``, ``demo``, ``bench``), each holding its options; ``options`` holds what several share; ``root`` the
global options, the order commands are listed in, and the entry point. User errors
(``apmpipe.storage.errors.ApmError``) print one line on stderr and exit 2; ``--debug`` shows their traceback. Any
other exception is a bug and keeps its traceback.
"""

from .root import app, main

__all__ = ["app", "main"]
