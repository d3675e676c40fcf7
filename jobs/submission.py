"""What a submitter may attach to a job, and idempotent resubmission, shared by `athanor submit` and `POST /jobs`.

- A submission id (`--submission-id`, `?submission_id=`, JSON `submission_id`): the client's own name for this
  submission. Sending it again with the same recipe (same text and overrides, hence the same recipe hash) and the
  same labels returns the job it created (the API answers 200 instead of 201); with anything different it is a
  conflict (409, exit code 4) naming what differs, and no job is created. A retry after a lost response thus never
  queues a job twice.
- Labels (`--label KEY=VALUE`, `?label=KEY=VALUE`, JSON `labels`): a small string map stored on the job and
  returned with it (team, ticket, experiment); athanor never reads them.

    .venv/bin/python -m pytest tests/jobs/test_api_submission.py -q
"""

from __future__ import annotations

import re
from typing import Any

from athanor.jobs.job_row import Job, SubmissionExists
from athanor.jobs.recipe_yaml import Problem
from athanor.jobs.store import JobStore

SUBMISSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # anchored: JSON Schema patterns search
LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
MAX_LABELS = 32
MAX_LABEL_VALUE = 256


class SubmissionConflict(Exception):
    """The submission id names a job made from a different request."""

    def __init__(self, job: Job, differs: str) -> None:
        super().__init__(f"submission id {job.submission_id!r} was used for job {job.id} with {differs}; send the "
                         f"same request to get that job back, or choose a new submission id")
        self.job = job


def submission_id_problems(value: Any, where: str = "submission_id") -> list[Problem]:
    if value is None:
        return []
    if isinstance(value, str) and SUBMISSION_ID.fullmatch(value):
        return []
    return [Problem(where, None, value, "a submission id is 1 to 128 characters: letters, digits and . _ : - "
                                        "(starting with a letter or digit), e.g. nightly-2026-12-07")]


def label_problems(labels: Any, where: str = "labels") -> list[Problem]:
    """Every problem with a label map: at most 32 labels; keys of 1-63 letters, digits, . _ / - (starting and ending
    with a letter or digit); values strings of at most 256 printable characters."""
    if not isinstance(labels, dict):
        return [Problem(where, None, labels, "labels are a map of strings, e.g. {\"team\": \"search\"}")]
    problems = []
    if len(labels) > MAX_LABELS:
        problems.append(Problem(where, None, f"{len(labels)} labels", f"at most {MAX_LABELS} labels"))
    for key, value in labels.items():
        if not isinstance(key, str) or not LABEL_KEY.fullmatch(key):
            problems.append(Problem(f"{where}.{key}", None, key, "a label key is 1 to 63 letters, digits and . _ / - "
                                                                 "starting and ending with a letter or digit"))
        elif not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not value.isprintable():
            problems.append(Problem(f"{where}.{key}", None, value, f"a label value is a string of at most "
                                                                   f"{MAX_LABEL_VALUE} printable characters"))
    return problems


def parse_labels(pairs: list[str], where: str = "--label") -> tuple[dict[str, str], list[Problem]]:
    """KEY=VALUE strings (the CLI's --label, the API's ?label=) as a map, with every problem; a key given twice is
    one of them."""
    labels: dict[str, str] = {}
    problems = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            problems.append(Problem(where, None, pair, "write a label as KEY=VALUE, e.g. team=search"))
        elif key in labels:
            problems.append(Problem(f"{where} {key}", None, pair, "this label is given twice; keep one"))
        else:
            labels[key] = value
    return labels, problems + label_problems(labels, where)


def create_job(store: JobStore, loaded: Any, *, recipe_path: str | None, submission_id: str | None = None,
               labels: dict[str, str] | None = None) -> tuple[Job, bool]:
    """The job for a validated recipe (`loaded`): (a new PENDING job, True), or (the job this submission id made
    earlier from the same request, False). SubmissionConflict when that earlier request was a different one."""
    labels = labels or {}
    try:
        job = store.create(name=loaded.recipe.name, method=loaded.recipe.method, recipe_text=loaded.text,
                           recipe_path=recipe_path, overrides=loaded.overrides, recipe_hash=loaded.hash,
                           max_attempts=loaded.recipe.train.max_attempts, submission_id=submission_id, labels=labels)
    except SubmissionExists as exists:
        earlier = exists.job
        if earlier.recipe_hash != loaded.hash:
            differs = f"another recipe (hash {earlier.recipe_hash}, this one {loaded.hash})"
            raise SubmissionConflict(earlier, differs) from None
        if earlier.labels != labels:
            raise SubmissionConflict(earlier, f"other labels ({earlier.labels})") from None
        return earlier, False
    return job, True
