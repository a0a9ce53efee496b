"""A studio encoder publishes: FFmpeg 9's WHIP muxer (offers without candidates) to aiortc students."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pytest

from skyclass.loadtest.clients import encode_index_frame

from test_lifecycle import Student, room_state

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

WIDTH, HEIGHT, FPS, SECONDS = 320, 240, 15, 10


def write_indexed_clip(path: Path) -> int:
    """Raw yuv420p frames spelling their own index, so students can check what they decode."""
    chroma = np.full((HEIGHT // 2, WIDTH), 128, dtype=np.uint8).tobytes()
    count = FPS * SECONDS
    with path.open("wb") as f:
        for i in range(count):
            f.write(encode_index_frame(i, WIDTH, HEIGHT).tobytes() + chroma)
    return count


@pytest.mark.parametrize("dtls_active", [False, True], ids=["ffmpeg-dtls-passive", "ffmpeg-dtls-active"])
async def test_ffmpeg_whip_publisher_with_students(server, tmp_path: Path, dtls_active: bool) -> None:
    room = f"ffmpeg-{int(dtls_active)}"
    clip = tmp_path / "clip.yuv"
    frames = write_indexed_clip(clip)
    students = [await Student().join(server, room, f"s{i}") for i in range(3)]
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "warning", "-re",
        "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{WIDTH}x{HEIGHT}", "-r", str(FPS), "-i", str(clip),
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={SECONDS}",
        "-c:v", "libx264", "-profile:v", "baseline", "-tune", "zerolatency", "-g", str(FPS), "-b:v", "600k",
        "-pix_fmt", "yuv420p", "-c:a", "libopus", "-ar", "48000", "-ac", "2",
        "-f", "whip", "-authorization", server.token("teacher", room, "studio"),
    ]
    if dtls_active:
        cmd += ["-whip_flags", "dtls_active"]
    cmd.append(f"{server.url}/whip/{room}")
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert all(await asyncio.gather(*(s.wait_frames(4 * FPS, 30) for s in students))), \
            [s.frames for s in students]
        state = await room_state(server, room)
        assert state["live"] and state["publisher"] == "studio" and state["viewers"] == 3
        assert state["codecs"]["video"].lower() == "video/h264"
        for s in students:
            seen = s.checker.indices
            assert all(0 <= i < frames for i in seen) and seen == sorted(seen)
            assert s.checker.bad_frames <= 2
        out, _ = await asyncio.wait_for(proc.communicate(), SECONDS + 20)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        # FFmpeg DELETEs its session at the end: the room is no longer live.
        assert (await room_state(server, room))["live"] is False
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*(s.close() for s in students))
