"""One downloadable file per lesson: the HLS segments remuxed (never transcoded) with PyAV.

MP4 gets ``movflags=faststart`` (the ``moov`` in front) so a player can scrub it while it
downloads; a VP8 lesson becomes a WebM with cues. Built on first request and kept beside
the segments; a recording still in progress has no download yet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import av

from .playlist import PLAYLIST_NAME

logger = logging.getLogger(__name__)


def download_path(directory: Path, container: str) -> Path:
    return directory / ("lesson.webm" if container == "webm" else "lesson.mp4")


def remux(directory: Path, container: str, log_prefix: str = "") -> Path:
    """Write ``lesson.mp4`` (or ``.webm``) from the recording's playlist; returns its path."""
    target = download_path(directory, container)
    tmp = target.with_name(target.name + ".tmp")
    options = {"allowed_extensions": "ALL", "allowed_segment_extensions": "ALL", "extension_picky": "0"}
    with av.open(str(directory / PLAYLIST_NAME), options=options) as source:
        out_format = "webm" if container == "webm" else "mp4"
        out_options = {} if container == "webm" else {"movflags": "+faststart"}
        with av.open(str(tmp), "w", format=out_format, options=out_options) as sink:
            mapping = {}
            for stream in source.streams:
                if stream.type in ("video", "audio"):
                    mapping[stream.index] = sink.add_stream_from_template(stream)
            packets = 0
            for packet in source.demux(*[s for s in source.streams if s.index in mapping]):
                if packet.dts is None or packet.size == 0:
                    continue
                packet.stream = mapping[packet.stream_index]
                sink.mux(packet)
                packets += 1
    os.replace(tmp, target)
    logger.info("%s remuxed %d packets into %s (%d bytes)", log_prefix, packets, target.name, target.stat().st_size)
    return target
