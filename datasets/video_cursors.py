"""Camera videos a pack actor keeps open between shards, so a shard that starts where the last one stopped
continues the decoder instead of reopening the video and seeking.

Opening a capture video probes it by decoding a frame (~7 ms at 1100x1604), and a seek decodes from the
keyframe before the target: up to a whole GOP per video per shard (x264's default GOP is 250 frames). Shards
are consecutive frame ranges and ``run_units`` hands each actor a contiguous run of them, so most shards
continue. The price is memory: a suspended decoder holds its frame pool (~13 MB per video at 1100x1604), for
every colour and alpha video of one shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from geodiff4d.core.io.video import DecodeCount
from geodiff4d.datasets.nersemble import NersembleDataset, NersembleError, NersembleFrame

# (root, subject, sequence, camera serial)
VideoKey = tuple[str, str, str, str]


class VideoCursors:
    """Open ``NersembleDataset.frames`` iterators, each with the next frame it yields."""

    def __init__(self, count: DecodeCount, threads: int = 1) -> None:
        self.count, self.threads = count, threads
        self.open: dict[VideoKey, tuple[int, Iterator[NersembleFrame]]] = {}

    def keep(self, starts: Mapping[VideoKey, int]) -> None:
        """Close every cursor that a unit reading ``starts`` (video -> first frame) will not continue, before it
        opens its own: only one unit's decoders are held at a time."""
        for key in list(self.open):
            if starts.get(key) != self.open[key][0]:
                self.open.pop(key)[1].close()

    def frames(
        self, dataset: NersembleDataset, key: VideoKey, start: int, stop: int
    ) -> Iterator[NersembleFrame]:
        """Frames ``start <= frame < stop`` of one camera, continuing its cursor when it stands at ``start``.

        A cursor is kept only once ``stop`` is reached; one left early (an error, a consumer that stops) is
        dropped with its decoder.
        """
        position, frames = self.open.pop(key, (None, None))
        if position != start:
            if frames is not None:
                frames.close()
            _, subject, sequence, serial = key
            frames = dataset.frames(
                subject, sequence, serial, start=start, threads=self.threads, count=self.count
            )
        for index in range(start, stop):
            frame = next(frames, None)
            if frame is None:
                raise NersembleError(f"{dataset.video_path(*key[1:])}: the video ends before frame {index}")
            yield frame
        self.open[key] = (stop, frames)
