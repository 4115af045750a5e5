"""The records of a `.wandb` run file, read back for tests: the file is a 7-byte header (":W&B",
two magic bytes, a version) followed by LevelDB's log format (32 KiB blocks of chunks, each
with a 4-byte checksum, a 2-byte little-endian length and a type: 1 full, 2 first, 3 middle,
4 last); each whole record is one `wandb_internal_pb2.Record` (wandb's own protobuf)."""
from pathlib import Path

BLOCK, CHUNK_HEADER = 32 * 1024, 7


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a .wandb file"
    pos, pending = 7, b""
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # the tail of a block is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk if kind == 4 else chunk)
            pending = b""
            yield record
        elif kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + chunk
