"""The compiled CRC-32C of TensorBoard's event records: the same bytes as TensorBoard's own."""

from __future__ import annotations

import os
import struct

import pytest
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c, masked_crc32c
from torch.utils.tensorboard import SummaryWriter

from lightning_swim import _tensorboard
from lightning_swim._cpu_kernel import CpuKernelUnavailableError, load_cpu_kernel


@pytest.fixture(scope="module")
def kernel():
    try:
        return load_cpu_kernel()
    except CpuKernelUnavailableError as err:
        if os.environ.get("LIGHTNING_SWIM_REQUIRE_CPU_KERNEL") == "1":
            raise
        pytest.skip(f"the compiled CPU kernel is not available here: {err}")


def test_the_kernel_crc32c_is_tensorboards(kernel):
    for n in [*range(40), 4095, 26_003]:  # every tail length of the 8-byte steps
        data = os.urandom(n)
        assert kernel.crc32c(data) == crc32c(data)
        assert _tensorboard.masked(kernel.crc32c(data)) == masked_crc32c(data)
    assert kernel.crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C


def _records(data: bytes):
    """``(header, header_crc, payload, payload_crc)`` of every record of an event file."""
    at = 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at : at + 8])
        (header_crc,) = struct.unpack("<I", data[at + 8 : at + 12])
        payload = data[at + 12 : at + 12 + n]
        (payload_crc,) = struct.unpack("<I", data[at + 12 + n : at + 16 + n])
        yield data[at : at + 8], header_crc, payload, payload_crc
        at += 16 + n


def test_a_sped_up_writer_writes_records_tensorboard_reads(kernel, tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    writer = SummaryWriter(str(tmp_path))
    assert _tensorboard.speed_up(writer) and _tensorboard.speed_up(writer)  # idempotent
    writer.add_scalar("a", 1.5, 3)
    writer.add_text("b", "x" * 30_000, 4)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    records = list(_records(path.read_bytes()))
    assert len(records) == 3  # the file's version, the scalar, the text
    for header, header_crc, payload, payload_crc in records:  # every checksum as TensorBoard computes it
        assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload)
    events = list(EventFileLoader(str(path)).Load())
    assert [e.step for e in events[1:]] == [3, 4]


def test_a_writer_of_another_kind_is_left_alone(kernel):
    class Other:
        def _get_file_writer(self):
            raise AttributeError("not torch's")

    assert not _tensorboard.speed_up(Other())
    assert not _tensorboard.speed_up(object())


def test_a_crc_that_differs_from_tensorboards_is_not_used(kernel, tmp_path, monkeypatch):
    monkeypatch.setattr(type(kernel), "crc32c", lambda self, data: crc32c(data) ^ 1)
    writer = SummaryWriter(str(tmp_path))
    records = writer._get_file_writer().event_writer._async_writer._writer
    assert not _tensorboard.speed_up(writer)
    assert "write" not in vars(records)  # its own method, untouched
    writer.close()
