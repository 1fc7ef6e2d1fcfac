"""A run's folder of artifacts: fresh for every run, holding its config from the start, and filled with what was
measured even when the run fails."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

from omegaconf import DictConfig, OmegaConf

from continual.config import ConfigError, check_folder_name, to_yaml
from continual.report import fresh_run_dir


def open_run_dir(parent: Union[str, Path], name: str, cfg: DictConfig) -> Path:
    """A new, empty folder ``parent/name`` (``name-2``, ``name-3``... when an earlier run left files there, so
    nothing is overwritten) holding ``config.yaml``; the caller names its run after the folder it got.

    Raises:
        ConfigError: ``name`` is not a single folder name, or ``parent/name`` is not inside ``tracking.output_dir``
            (a name derived from the config holds ``..`` or a path separator); nothing is created then.
    """
    check_folder_name("tracking.run_name", name)
    output_dir = OmegaConf.select(cfg, "tracking.output_dir")
    if output_dir is not None:
        root, target = os.path.abspath(output_dir), os.path.abspath(Path(parent) / name)
        if os.path.commonpath([root, target]) != root:
            raise ConfigError(f"tracking.experiment: the run folder {target} would be outside tracking.output_dir "
                              f"({root}); name the experiment with a single folder name")
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
