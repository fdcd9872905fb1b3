"""The one explicit value the ingest path is built from."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

TensorDtype = Literal["uint8", "float32"]
PlanSource = Literal["settings", "autotune", "minimal", "benchmark"]


@dataclass(frozen=True)
class LoaderPlan:
    """How one job's images flow from the API into the model.

    Ingest memory is roughly ``decoded_image_bytes x (batch_size x (1 + num_workers x prefetch_factor)
    + num_workers x download_threads)``, doubled for pinned copies; ``tasks_per_reserve`` bounds how
    many reserved tasks a DataLoader worker holds (``held_tasks``; the reservation timeout must
    cover them).

    ``tensor_dtype`` is ``"uint8"`` (decode to uint8 CHW, float conversion on the inference device)
    or ``"float32"``, which reproduces the ADC worker's host-side float tensors for benchmarks only.
    ``source`` says where the numbers came from: ``settings``, ``autotune``, ``minimal`` or ``benchmark``.
    ``inference_threads`` is the number of intra-op threads torch uses for inference in the main
    process (``torch.set_num_threads``); 0 leaves torch's default (the CPU count, or
    ``OMP_NUM_THREADS``). On a CPU-only host the loader workers decode on the same cores, and
    OpenMP threads that wait at a barrier keep their core busy, so fewer inference threads can
    be faster overall.
    """

    tasks_per_reserve: int
    batch_size: int
    num_workers: int
    prefetch_factor: int
    pin_memory: bool
    download_threads: int
    tensor_dtype: TensorDtype = "uint8"
    source: PlanSource = "settings"
    inference_threads: int = 0

    def __post_init__(self) -> None:
        for name in ("tasks_per_reserve", "batch_size", "prefetch_factor", "download_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoaderPlan.{name} must be >= 1, got {getattr(self, name)}")
        if self.inference_threads < 0:
            raise ValueError(f"LoaderPlan.inference_threads must be >= 0, got {self.inference_threads}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderPlan.num_workers must be >= 0, got {self.num_workers}")
        if self.tensor_dtype not in ("uint8", "float32"):
            raise ValueError(f"LoaderPlan.tensor_dtype must be uint8 or float32, got {self.tensor_dtype!r}")

    @property
    def held_tasks(self) -> int:
        """Most reserved tasks one loader worker holds before yielding them: a reservation, plus
        the previous one's last downloads still in flight when it was made (the ingest reserves
        ahead so its round trip overlaps them)."""
        return self.tasks_per_reserve + self.downloads_per_lane

    @property
    def downloads_per_lane(self) -> int:
        """Downloads one loader worker keeps in flight: it never downloads ahead of its reservation."""
        return min(self.download_threads, self.tasks_per_reserve)

    def with_changes(self, **changes: object) -> "LoaderPlan":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"tasks_per_reserve={self.tasks_per_reserve} batch_size={self.batch_size} "
            f"num_workers={self.num_workers} prefetch_factor={self.prefetch_factor} "
            f"pin_memory={self.pin_memory} download_threads={self.download_threads} "
            f"dtype={self.tensor_dtype} inference_threads={self.inference_threads or 'default'} "
            f"source={self.source}"
        )


MINIMAL_PLAN = LoaderPlan(
    tasks_per_reserve=1, batch_size=1, num_workers=0, prefetch_factor=1,
    pin_memory=False, download_threads=1, source="minimal",
)
