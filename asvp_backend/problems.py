"""What is wrong with a project's files (and its Label Studio connection), in words: for `asvp-backend status`
and `GET /projects/N`.

Cheap checks only (headers and sizes, never full reads), so a status page can call it on every refresh.
Each problem names the file and what is wrong; the jobs repair what can be rebuilt (see decisions.md).
"""

from __future__ import annotations

from asvp_backend.alignment.summary import damaged_models
from asvp_backend.artefacts import ArtefactCorrupt, read_ranking
from asvp_backend.features import FeatureStore
from asvp_backend.labelstudio import credentials
from asvp_backend.layout import ProjectLayout
from asvp_backend.state import ProjectState, StateCorrupt, TaskSnapshot


def project_problems(layout: ProjectLayout, state: ProjectState) -> list[str]:
    problems = [str(problem) for problem in FeatureStore(layout.features_dir).verify()]
    connection = credentials.problem(layout)
    if connection:
        problems.append(connection)
    try:
        TaskSnapshot(layout.model_dir, layout.project_id).load()
    except StateCorrupt as exc:
        problems.append(f"{exc} (the next sync rebuilds it from Label Studio)")
    if state.round:
        try:
            if read_ranking(layout, state.version) is None:
                problems.append(f"{layout.round_dir(state.version)} is missing (the next round replaces it)")
        except ArtefactCorrupt as exc:
            problems.append(f"{exc} (a new round is queued by /predict)")
    problems += [f"model {model}: {problem} (not served or exported; Start Training writes a new one)"
                 for model, problem in damaged_models(layout, state).items()]
    return problems
