"""What rafale says while a long stage runs (reading a source, training a tokenizer, tokenizing, writing the cache).

    with Progress("tokenizing train", total=len(texts), unit="documents") as progress:
        for batch in ...:
            progress.update(len(batch))

On a terminal it is a tqdm bar; in a log (stderr is not a terminal), a plain line every `every_s` seconds,
`rafale: tokenizing train: 1,200 of 4,000 documents (30%), 10 s`, and a last one with the stage's time when it
took that long. A stage that cannot count (a library call that runs for a while) still says it is running, from a
thread that looks every second. The libraries' own bars (datasets' "Generating train split", `map`'s, the tokenizers
trainer's) are turned off where they are called; this is the one that speaks for them.
"""

import sys
import threading
import time

EVERY_S = 5.0  # seconds between lines in a log


class Progress:
    def __init__(self, desc: str, total: int | None = None, unit: str = "", every_s: float | None = None,
                 stream=None):
        self.desc, self.total, self.unit = desc, total, unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.stream = stream or sys.stderr  # a status, not a result: stdout stays the command's output (CSV)
        self.count, self.lines = 0, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        self._done = threading.Event()
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=f"rafale: {desc}", total=total, unit=f" {unit}" if unit else "it", file=self.stream,
                            dynamic_ncols=True, leave=False)
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last_line >= self.every_s:
            self._say()

    def _say(self) -> None:
        self.last_line = time.monotonic()
        self.lines += 1
        print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """'tokenizing train: 1,200 of 4,000 documents (30%), 10 s'."""
        elapsed = time.monotonic() - self.started
        done = ""
        if self.total:
            done = f"{self.count:,} of {self.total:,} {self.unit} ({self.count / self.total:.0%}), "
        elif self.count:
            done = f"{self.count:,} {self.unit}, "
        return f"rafale: {self.desc}: {done}{elapsed:.0f} s"

    def _tick(self) -> None:
        """Between updates (a library call that runs for a while): the bar's clock moves, a log gets its line."""
        while not self._done.wait(1.0):
            if self.bar is not None:
                self.bar.refresh()
            elif time.monotonic() - self.last_line >= self.every_s:
                self._say()

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        if self.bar is not None:
            self.bar.close()
        elif self.lines:  # a stage that was long enough to speak says when it is done
            print(self.line() + " (done)", file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
