"""Interactive use and shareable reports.

* :mod:`workbench.ui.launcher`: the ipywidgets launcher (``workbench.ui.launcher()``) that runs a job in
  the background through the same path as ``workbench run``;
* :mod:`workbench.ui.monitor`: turns a run's progress events into what the launcher shows (pure, testable);
* :mod:`workbench.ui.viewers`: slice viewer, static 3-D pictures and standalone k3d snapshots;
* :mod:`workbench.ui.results`: the results panel of a finished run folder;
* :mod:`workbench.ui.gallery`: the gallery of run folders (``workbench report --index``) and run tables.
"""

from __future__ import annotations


def launcher(*args, **kwargs):
    """Show the launcher widget; see :func:`workbench.ui.launcher.launcher`."""
    from workbench.ui.launcher import launcher as _launcher

    return _launcher(*args, **kwargs)
