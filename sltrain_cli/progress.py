"""The training loop's progress bar (rich, imported only when a bar is shown); the CLI hands it to ``train``."""
from __future__ import annotations

import math
from typing import Optional


class TrainProgress:
    """A rich progress bar for the training loop (loss, ppl, lr, tokens/s); silent when disabled."""

    def __init__(self, total: int, completed: int = 0, enabled: bool = True, description: str = "train"):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
        self._task = self._progress.add_task(description, total=total, completed=completed, stats="")

    def __enter__(self):
        if self.enabled:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.__exit__(*exc)

    def update(self, completed: int, loss: Optional[float] = None, lr: Optional[float] = None,
               tps: Optional[float] = None) -> None:
        if not self.enabled:
            return
        fields = {}
        if loss is not None:
            ppl = math.exp(min(loss, 50.0))
            fields["stats"] = f"loss {loss:.3f}  ppl {ppl:,.1f}  lr {lr:.2e}  {tps:,.0f} tok/s"
        self._progress.update(self._task, completed=completed, **fields)

    def note(self, text: str) -> None:
        if self.enabled:
            self._progress.console.print(text)
