"""The recorder's frame queue is bounded: an encoder that falls behind drops (and counts) frames, never grows."""

import asyncio

import numpy as np

from streamer.recorder import Mp4Recorder


def test_queue_is_bounded_and_drops_are_counted(tmp_path):
    rec = Mp4Recorder(str(tmp_path / "r.mp4"), fps=16, width=32, height=32, queue_seconds=1.0)
    frame = np.zeros((32, 32, 3), np.uint8)
    for _ in range(100):                        # not started: nothing drains the queue
        rec.write(frame)
    assert rec._queue.qsize() == 16 and rec.dropped == 84


def test_leftover_frames_wait_for_room_and_all_reach_the_file(tmp_path):
    import av

    rec = Mp4Recorder(str(tmp_path / "r.mp4"), fps=16, width=32, height=32, queue_seconds=0.5)
    rec.start()

    async def go():
        await rec.write_all([np.full((32, 32, 3), i, np.uint8) for i in range(40)])   # 5x the queue
        return await rec.close()
    assert asyncio.run(go()) == 40 and rec.dropped == 0
    with av.open(str(tmp_path / "r.mp4")) as f:
        assert sum(1 for _ in f.decode(video=0)) == 40
