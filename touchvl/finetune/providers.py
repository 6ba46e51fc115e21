"""Which implementation of the fine-tuning contract a provider uses (the one place that knows them all)."""
from __future__ import annotations

from touchvl.finetune.contract import DatasetFiles
from touchvl.params import Params


def submission(params: Params, files: DatasetFiles):
    """The provider's submission for these files: ``.run(wait)`` submits once and polls (or trains, for
    ``local``); ``.status()``, ``.event_lines()`` and ``.cancel()`` act on the job already submitted."""
    if params.finetune.provider == "local":
        from touchvl.finetune.local.job import LocalSubmission

        return LocalSubmission(params, files)
    from touchvl.finetune.remote import Submission, make_client

    return Submission(params, make_client(params.finetune), files)
