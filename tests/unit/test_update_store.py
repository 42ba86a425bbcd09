"""The spill store of a needs-all rule: rows in, coordinate blocks out, pages not kept."""

from __future__ import annotations

import mmap

import pytest
import torch

from aggregator_service.update_store import UpdateStore


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mapping of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = fields[-1] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_rows_come_back_as_coordinate_blocks_clipped_and_weighted(tmp_path):
    numel = 1000
    deltas = [torch.randn(numel) for _ in range(3)]
    with UpdateStore(tmp_path / "u.f32", numel, capacity=4) as store:
        assert store.append(deltas[0], weight=10, scale=1.0) == 0
        assert store.append(deltas[1], weight=20, scale=0.25) == 1
        assert store.append(deltas[2], weight=5) == 2
        assert len(store) == 3 and store.weights == [10.0, 20.0, 5.0]
        expected = torch.stack([deltas[0], deltas[1] * 0.25, deltas[2]])  # [3, numel]
        starts, pieces = [], []
        for start, block, weights in store.iter_blocks(300):
            assert block.shape[0] == 3 and block.is_contiguous()
            assert torch.equal(weights, torch.tensor([10.0, 20.0, 5.0]))
            starts.append(start)
            pieces.append(block)
        assert starts == [0, 300, 600, 900]
        assert [p.shape[1] for p in pieces] == [300, 300, 300, 100]
        assert torch.equal(torch.cat(pieces, dim=1), expected)
        # A block larger than the model is the whole model.
        [(start, whole, _)] = list(store.iter_blocks(10 * numel))
        assert start == 0 and torch.equal(whole, expected)


def test_an_update_is_copied_so_its_receive_buffer_can_be_reused(tmp_path):
    buffer = torch.ones(64)
    with UpdateStore(tmp_path / "u.f32", 64, capacity=2) as store:
        store.append(buffer, weight=1)
        buffer.fill_(7.0)  # the next upload reuses the buffer
        store.append(buffer, weight=1)
        [(_, block, _)] = list(store.iter_blocks(64))
    assert torch.equal(block, torch.stack([torch.ones(64), torch.full((64,), 7.0)]))


def test_updates_live_in_the_file_not_in_resident_memory(tmp_path):
    numel = 256 * 1024  # 1 MiB per update
    path = tmp_path / "u.f32"
    with UpdateStore(path, numel, capacity=8) as store:
        for i in range(8):
            store.append(torch.full((numel,), float(i)), weight=1)
            assert _mapped_rss_kb(path) == 0  # written, then dropped from this process
        # Sparse until written: 8 rows of 1 MiB each hold data now.
        assert path.stat().st_size == 8 * numel * 4
        for _start, block, _ in store.iter_blocks(4096):
            # Only the block copy is held: the mapped pages it was read from are dropped.
            assert _mapped_rss_kb(path) <= 8 * mmap.PAGESIZE // 1024
            assert block.shape == (8, 4096)
            break
    assert not path.exists()


def test_a_partly_filled_store_reads_only_its_rows(tmp_path):
    with UpdateStore(tmp_path / "u.f32", 10, capacity=5) as store:
        store.append(torch.arange(10.0), weight=3)
        [(_, block, weights)] = list(store.iter_blocks(10))
    assert block.shape == (1, 10) and weights.tolist() == [3.0]


def test_misuse_is_refused(tmp_path):
    path = tmp_path / "u.f32"
    path.write_bytes(b"left by a crash")  # scratch of a lost round: truncated
    store = UpdateStore(path, 16, capacity=1)
    with pytest.raises(ValueError, match="coordinates"):
        store.append(torch.zeros(15), weight=1)
    store.append(torch.zeros(16), weight=1)
    with pytest.raises(ValueError, match="full"):
        store.append(torch.zeros(16), weight=1)
    with pytest.raises(ValueError, match="block_size"):
        next(store.iter_blocks(0))
    blocks = store.iter_blocks(8)
    next(blocks)  # a reader still running does not keep the file mapped
    store.close()
    store.close()  # idempotent
    assert not path.exists()
    with pytest.raises(ValueError, match="closed"):
        next(blocks)
    with pytest.raises(ValueError, match="closed"):
        store.append(torch.zeros(16), weight=1)
    with pytest.raises(ValueError, match="> 0"):
        UpdateStore(path, 0, capacity=1)
