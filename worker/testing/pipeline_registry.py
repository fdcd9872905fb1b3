"""What an Antenna server stores when pipelines are registered, and what it checks when it saves a result.

Facts from /work/shared/adc-pipelines.md section 6 (Antenna ``ml/models/pipeline.py``,
``processing_service.py``, ``algorithm.py``):

Registration (``POST /projects/{id}/pipelines/``), item by item in body order, not atomic:
- a pipeline is found by slug, else by (name, version), else created; algorithms are only ever
  added to it, never removed;
- an algorithm is found by (key, version), else created; ``key`` is unique, and so is
  (name, version);
- a category map is stored only while the algorithm has none with non-empty ``data``; later maps
  are ignored; only ``task_type`` and ``uri`` are updated; a classification algorithm without a
  map (and without a stored one) fails the registration.

Save (after the POST answered 200), per success result:
- the pipeline is looked up by slug and must have exactly one algorithm of a detection task type;
- every detection's and classification's ``algorithm.key`` is a key registered for that pipeline;
- source image ids are integer strings;
- a classification's ``scores`` are non-empty and no longer than the algorithm's stored map (the
  server stores ``data[argmax(scores)]``; this check is stricter than Antenna, which fails only when
  the argmax falls past the map's end); an algorithm without a map gets a placeholder one built
  from the first classification's ``labels`` or indices, as Antenna does.
A result that fails is never acknowledged: the caller leaves its task to be redelivered.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from worker.schema import PipelineResultsResponse, RegisterPipelines

DETECTION_TASK_TYPES = ("detection", "localization", "segmentation")
CLASSIFICATION_TASK_TYPES = ("classification",)


class RegistrationError(Exception):
    """A registration the real server would refuse (an integrity error or PipelineNotConfigured)."""


@dataclass
class StoredAlgorithm:
    key: str
    version: int
    name: str
    task_type: str
    uri: Optional[str] = None
    category_map: Optional[dict] = None

    def has_valid_category_map(self) -> bool:
        return bool(self.category_map and self.category_map.get("data"))

    def map_length(self) -> int:
        return len(self.category_map["data"]) if self.has_valid_category_map() else 0


@dataclass
class StoredPipeline:
    slug: str
    name: str
    version: int
    description: str
    algorithms: list[tuple[str, int]] = field(default_factory=list)  # (key, version), in order added
    project_ids: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class RegistrationOutcome:
    pipelines_created: tuple[str, ...]
    pipelines_updated: tuple[str, ...]
    algorithms_created: tuple[str, ...]
    algorithms_added: tuple[str, ...]  # "<slug>:<key>" links made by this registration


class PipelineRegistry:
    """Pipelines and algorithms as an Antenna server stores them; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pipelines: dict[str, StoredPipeline] = {}
        self.algorithms: dict[tuple[str, int], StoredAlgorithm] = {}
        self.service_names: list[str] = []

    # ---- registration

    def register(self, project_id: int, body: RegisterPipelines) -> RegistrationOutcome:
        created, updated, algos_created, links = [], [], [], []
        with self._lock:
            if body.processing_service_name not in self.service_names:
                self.service_names.append(body.processing_service_name)
            for config in body.pipelines:
                pipeline, is_new = self._pipeline_for(config.slug, config.name, config.version, config.description)
                (created if is_new else updated).append(pipeline.slug)
                pipeline.project_ids.add(project_id)
                for algo_config in config.algorithms:
                    algorithm, algo_new = self._algorithm_for(algo_config.model_dump())
                    if algo_new:
                        algos_created.append(algorithm.key)
                    ref = (algorithm.key, algorithm.version)
                    if ref not in pipeline.algorithms:
                        pipeline.algorithms.append(ref)
                        links.append(f"{pipeline.slug}:{algorithm.key}")
        return RegistrationOutcome(tuple(created), tuple(updated), tuple(algos_created), tuple(links))

    def _pipeline_for(self, slug: str, name: str, version: int, description: str) -> tuple[StoredPipeline, bool]:
        found = self.pipelines.get(slug) or next(
            (p for p in self.pipelines.values() if (p.name, p.version) == (name, version)), None)
        if found is not None:
            return found, False
        pipeline = StoredPipeline(slug=slug, name=name, version=version, description=description)
        self.pipelines[slug] = pipeline
        return pipeline, True

    def _algorithm_for(self, config: dict[str, Any]) -> tuple[StoredAlgorithm, bool]:
        key, version = str(config["key"]), int(config.get("version") or 1)
        algorithm = self.algorithms.get((key, version))
        is_new = algorithm is None
        if algorithm is None:
            algorithm = self._new_algorithm(key, version, config)
        category_map = config.get("category_map")
        if not algorithm.has_valid_category_map():
            if category_map and category_map.get("data"):
                algorithm.category_map = category_map
            elif config["task_type"] in CLASSIFICATION_TASK_TYPES:
                raise RegistrationError(
                    f"No valid category map found for algorithm {key!r} with task type "
                    f"{config['task_type']!r}: a classification algorithm must bring one.")
        algorithm.task_type = str(config["task_type"])
        algorithm.uri = config.get("uri")
        return algorithm, is_new

    def _new_algorithm(self, key: str, version: int, config: dict[str, Any]) -> StoredAlgorithm:
        name = str(config["name"])
        if any(a.key == key for a in self.algorithms.values()):
            raise RegistrationError(f"algorithm key {key!r} already exists with another version "
                                    f"(key is unique)")
        if any((a.name, a.version) == (name, version) for a in self.algorithms.values()):
            raise RegistrationError(f"algorithm name {name!r} version {version} already exists under "
                                    f"another key ((name, version) is unique)")
        algorithm = StoredAlgorithm(key=key, version=version, name=name, task_type=str(config["task_type"]),
                                    uri=config.get("uri"))
        self.algorithms[(key, version)] = algorithm
        return algorithm

    # ---- save

    def is_registered(self, slug: str) -> bool:
        with self._lock:
            return slug in self.pipelines

    def save_error(self, result: PipelineResultsResponse) -> Optional[str]:
        """None if Antenna would save ``result``, else why its save fails (the task stays unacknowledged)."""
        with self._lock:
            pipeline = self.pipelines.get(result.pipeline)
            if pipeline is None:
                return f"pipeline {result.pipeline!r} is not registered (placeholder pipeline has no detector)"
            known = {key: self.algorithms[(key, version)] for key, version in pipeline.algorithms}
            detectors = [a.key for a in known.values() if a.task_type in DETECTION_TASK_TYPES]
            if len(detectors) != 1:
                return (f"pipeline {pipeline.slug!r} has {len(detectors)} detection algorithms {detectors}, "
                        "needs exactly 1")
            for image in result.source_images:
                if not _is_integer_text(image.id):
                    return f"source image id {image.id!r} is not an integer"
            for d_index, detection in enumerate(result.detections):
                problem = self._detection_error(pipeline.slug, known, detection)
                if problem is not None:
                    return f"detections[{d_index}]: {problem}"
        return None

    def _detection_error(self, slug: str, known: dict[str, StoredAlgorithm], detection: Any) -> Optional[str]:
        if detection.algorithm.key not in known:
            return (f"detection algorithm {detection.algorithm.key!r} is not registered for {slug!r}: "
                    f"known {sorted(known)}")
        for c_index, classification in enumerate(detection.classifications):
            algorithm = known.get(classification.algorithm.key)
            if algorithm is None:
                return (f"classifications[{c_index}]: algorithm {classification.algorithm.key!r} is not "
                        f"registered for {slug!r}: known {sorted(known)}")
            if not classification.scores:
                return f"classifications[{c_index}]: scores are empty"
            if not algorithm.has_valid_category_map():
                labels = classification.labels or [str(i) for i in range(len(classification.scores))]
                algorithm.category_map = {"data": [{"index": i, "label": s} for i, s in enumerate(labels)],
                                          "labels": list(labels)}
            if len(classification.scores) > algorithm.map_length():
                return (f"classifications[{c_index}]: {len(classification.scores)} scores for a category map of "
                        f"{algorithm.map_length()} entries ({algorithm.key!r})")
        return None

    # ---- inspection

    def snapshot(self) -> dict[str, Any]:
        """Plain values for tests and the control API: pipelines with their algorithm keys, algorithms."""
        with self._lock:
            return {
                "pipelines": {slug: {"name": p.name, "version": p.version, "projects": sorted(p.project_ids),
                                     "algorithms": [key for key, _ in p.algorithms]}
                              for slug, p in self.pipelines.items()},
                "algorithms": {key: {"name": a.name, "version": a.version, "task_type": a.task_type,
                                     "uri": a.uri, "category_map_entries": a.map_length(),
                                     "labels": list((a.category_map or {}).get("labels") or [])}
                               for (key, _), a in self.algorithms.items()},
                "service_names": list(self.service_names),
            }


def _is_integer_text(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
