"""Progress bars for the long loops a user waits on (evaluation, sampling, scoring, generation).

One place that sets how they look: on stderr, only when it is a terminal (a job's log file or a
CI pipe gets no carriage-return noise), refreshed at most once a second, gone when done.
"""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(total: int | None, desc: str, unit: str = "patient") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=None, leave=False, mininterval=1.0, dynamic_ncols=True)
