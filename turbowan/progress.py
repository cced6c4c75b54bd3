"""The one progress hook shared by the pipeline, the CLI and the ComfyUI nodes.

A hook is any callable ``hook(stage, done, total)``:

* ``stage`` is one of ``"encode"``, ``"sample"``, ``"decode"`` (VAE chunks and sampling steps);
* ``done`` counts finished units of that stage (1-based), ``total`` is the stage's unit count.

The hook is called *between* units of work, so it is also the cancellation point: a hook that
raises (ComfyUI's interrupt, Ctrl-C in the CLI) stops the run there, and the pipeline's
``finally`` blocks move every model back off the GPU.
"""

from __future__ import annotations

from typing import Callable, Optional

ProgressHook = Callable[[str, int, int], None]


def report(hook: Optional[ProgressHook], stage: str, done: int, total: int) -> None:
    """Call ``hook`` if there is one (keeps call sites free of ``if hook`` noise)."""
    if hook is not None:
        hook(stage, done, total)
