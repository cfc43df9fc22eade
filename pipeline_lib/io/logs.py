"""Send a job's logging, warnings and tqdm progress bars to the rule's ``log:`` file."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def job_logging(log_path: str | os.PathLike | None, name: str) -> Iterator[logging.Logger]:
    """Redirect stdout/stderr (and with them tqdm) into ``log_path`` for the job's duration.

    An exception is written to the log with its traceback and re-raised, so Snakemake reports
    the failure and the log says why.
    """
    logger = logging.getLogger("pipeline")
    if log_path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        yield logger
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as fh:
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        t0 = time.perf_counter()
        logger.info("job %s started (pid %d)", name, os.getpid())
        try:
            yield logger
            logger.info("job %s finished in %.1f s", name, time.perf_counter() - t0)
        except BaseException:
            fh.write(traceback.format_exc())
            raise
        finally:
            root.removeHandler(handler)
            logging.captureWarnings(False)
            sys.stdout, sys.stderr = old_out, old_err
