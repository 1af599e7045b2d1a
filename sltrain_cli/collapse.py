"""When a finite run has collapsed: the rule that makes such a run ``diverged`` (exit 3) instead of ``completed``."""
from __future__ import annotations

import math
from typing import Optional

COLLAPSE_LOGS = 5  # logged steps in a row, after warm-up, at a loss no better than a uniform prediction


class CollapseWatch:
    """A run whose model has collapsed is a diverged run, not a completed one (the loss and norms stay finite, so
    the non-finite check cannot see it). Two signs:

    - the training loss sits at or above ln(vocab size), the loss of a uniform prediction, at COLLAPSE_LOGS logged
      steps in a row after the lr warm-up;
    - the final validation perplexity is above the corpus's unigram perplexity although the training loss was once
      below the unigram loss: the model learned at least the word frequencies and then lost them. (A run too short
      to reach the unigram baseline is undertrained, not collapsed.)"""

    def __init__(self, vocab_size: int, unigram_ppl: Optional[float], warmup_steps: int):
        self.uniform_loss = math.log(vocab_size)
        self.unigram_loss = math.log(unigram_ppl) if unigram_ppl else None
        self.warmup_steps, self.run_of, self.beat_unigram = warmup_steps, [], False

    def logged(self, step: int, loss: float) -> Optional[str]:
        """Record a logged training loss; the reason when the run has collapsed, else None."""
        if self.unigram_loss is not None and loss < self.unigram_loss:
            self.beat_unigram = True
        if step <= self.warmup_steps or loss < self.uniform_loss:
            self.run_of = []
            return None
        self.run_of.append(step)
        if len(self.run_of) < COLLAPSE_LOGS:
            return None
        return (f"training loss >= ln(vocab size) = {self.uniform_loss:.3f} (a uniform prediction) at steps "
                f"{self.run_of[0]}-{self.run_of[-1]}, after the warm-up")

    def final(self, val_ppl: float, unigram_ppl: Optional[float]) -> Optional[str]:
        """The reason when the final validation perplexity says the run collapsed, else None."""
        if self.beat_unigram and unigram_ppl and val_ppl > unigram_ppl:
            return (f"final validation perplexity {val_ppl:.2f} is above the corpus's unigram perplexity "
                    f"{unigram_ppl:.2f}, which the training loss had once beaten")
        return None
