"""A run resumed at its last step still does its end-of-training work.

When the checkpoint a run resumes from is already at `max_steps`, Lightning's fit loop returns
at once and no `on_train_end` hook runs. A kill during the final export, validation or loss
plot would then lose them for good: every relaunch resumes at the last step and does nothing.
Here the loop of such a run calls the end-of-training hooks (each skips what is already on
disk), with the strategy still set up, as at the end of an uninterrupted run.
"""

from __future__ import annotations

import lightning as L


def resume_finishes_the_run(trainer: L.Trainer) -> None:
    """Make `trainer`'s fit loop run the `on_train_end` hooks when it resumes past its end."""
    loop = trainer.fit_loop
    lightning_run = loop.run

    def run_or_finish() -> None:
        loop.setup_data()  # what Lightning's run does first; it does not repeat it
        max_steps = trainer.max_steps
        if loop.skip and max_steps > 0 and trainer.global_step >= max_steps:
            loop.on_run_end()  # the on_train_end hooks, as an uninterrupted run ends
            return
        lightning_run()

    # Lightning has no public hook for this; `run` has had this shape throughout Lightning 2.
    setattr(loop, "run", run_or_finish)  # noqa: B010
