"""A run's folder of artifacts: fresh for every run, holding its config from the start, and filled with what was
measured even when the run fails."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from omegaconf import DictConfig

from continual.config import to_yaml
from continual.report import fresh_run_dir


def open_run_dir(parent: Union[str, Path], name: str, cfg: DictConfig) -> Path:
    """A new, empty folder ``parent/name`` (``name-2``, ``name-3``... when an earlier run left files there, so
    nothing is overwritten) holding ``config.yaml``; the caller names its run after the folder it got."""
    folder = fresh_run_dir(parent, name)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    return folder


@contextmanager
def artifacts_on_failure(write: Callable[[], object]) -> Iterator[None]:
    """Run the body; if it raises (an interrupt included), ``write()`` what was produced so far, then re-raise.

    Example::

        with artifacts_on_failure(lambda: finish(tracker, failed=True)):
            ...  # train and evaluate
        finish(tracker, failed=False)
    """
    try:
        yield
    except BaseException:
        write()
        raise
