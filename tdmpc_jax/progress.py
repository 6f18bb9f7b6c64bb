"""One progress display for every long loop (training, online training, evaluation/collection rollouts).

`Progress` is a tqdm bar on stderr whose rate and ETA leave out the first `update`: the first step of a
jitted loop pays for XLA compilation (seconds to minutes), so timing restarts once it is done and the ETA
is the average rate of the steady-state steps since then (`elapsed` counts from there too). Disabled
(`enabled=False`, the loops' `progress=False`) it prints nothing.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

BAR_FORMAT = "  {desc}{n_fmt}/{total_fmt}{unit}  {rate_noinv_fmt}  elapsed {elapsed}  ETA {remaining}{postfix}"


class Progress:
    """`with Progress(total, "updates", initial=done) as bar: ... bar.update(n); bar.set_postfix(loss=...)`
    shows e.g. `  120/1000 updates  35.20 updates/s  elapsed 00:03  ETA 00:25, loss=0.5` (unit: plural)."""

    def __init__(self, total: int, unit: str = "steps", desc: str = "", initial: int = 0, enabled: bool = True,
                 smoothing: float = 0.0, file=None):
        self._bar = tqdm(total=total, initial=initial, unit=" " + unit, desc=desc, disable=not enabled,
                         file=file if file is not None else sys.stderr, bar_format=BAR_FORMAT,
                         smoothing=smoothing,  # 0: the mean rate since timing started; > 0: an EMA of recent
                         # rates (for loops whose phases run at different speeds, e.g. online seeding/training)
                         mininterval=1.0, dynamic_ncols=True, leave=True)
        self._timing = False

    @property
    def n(self) -> int:
        return self._bar.n

    def update(self, n: int = 1):
        bar = self._bar
        if bar.disable:
            bar.n += n
            return
        if self._timing:
            bar.update(n)
            return
        # the first step (which compiled) is counted but not timed: restart the clock (as tqdm.reset does)
        # with it as the initial count, so the rate and the ETA come from the steps after it
        self._timing = True
        bar.n += n
        bar.initial = bar.last_print_n = bar.n
        bar.start_t = bar.last_print_t = bar._time()
        bar.refresh()

    def set_postfix(self, **values):
        """Shown after the ETA (e.g. the latest loss); drawn with the next update."""
        if not self._bar.disable:
            self._bar.set_postfix(values, refresh=False)

    def write(self, line: str):
        """Print a line above the bar (it is redrawn below); nothing when disabled."""
        if not self._bar.disable:
            self._bar.write(line, file=self._bar.fp)

    def close(self):
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
