"""The sans-I/O NBD codec: handshake state machine, request parser, error rules (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from disk_buffer import nbd
from disk_buffer.nbd import Cmd, Info, Opt, Rep

SIZE = 1 << 20
EXPORTS = {
    "replica": nbd.ExportInfo("replica", SIZE, nbd.DEFAULT_TRANSMISSION_FLAGS),
    "view": nbd.ExportInfo("view", SIZE, nbd.DEFAULT_TRANSMISSION_FLAGS),
}
CLIENT_FLAGS = struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    replies = []
    pos = 0
    while pos < len(data):
        option, reply, length = nbd.decode_option_reply(data[pos:])
        replies.append((option, reply, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return replies


def test_greeting_is_fixed_newstyle() -> None:
    greeting = nbd.server_greeting()
    assert greeting[:8] == b"NBDMAGIC" and greeting[8:16] == b"IHAVEOPT"
    assert struct.unpack(">H", greeting[16:]) == (nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES,)


def test_go_reports_export_and_block_size_and_keeps_leftover() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    request = nbd.encode_request(Cmd.READ, 7, 0, 512)
    out = hs.receive(CLIENT_FLAGS + nbd.encode_go("view", (Info.BLOCK_SIZE, Info.NAME)) + request)
    replies = option_replies(out)
    assert [r[1] for r in replies] == [Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK]
    infos = {struct.unpack(">H", r[2][:2])[0]: r[2][2:] for r in replies if r[1] == Rep.INFO}
    assert struct.unpack(">QH", infos[Info.EXPORT]) == (SIZE, nbd.DEFAULT_TRANSMISSION_FLAGS)
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE]) == (512, 4096, nbd.MAX_PAYLOAD)
    assert infos[Info.NAME] == b"view"
    assert hs.export is EXPORTS["view"] and hs.leftover == request
    assert hs.block_size_requested


def test_handshake_byte_by_byte() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    stream = CLIENT_FLAGS + nbd.encode_option(Opt.LIST) + nbd.encode_go("replica")
    out = b"".join(hs.receive(bytes([b])) for b in stream)
    replies = option_replies(out)
    servers = [r[2][4:] for r in replies if r[1] == Rep.SERVER]
    assert servers == [b"replica", b"view"]
    assert hs.export is EXPORTS["replica"] and hs.leftover == b""
    assert hs.block_size_requested


def test_go_without_block_size_request_is_remembered() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    hs.receive(CLIENT_FLAGS + nbd.encode_go("view", ()))
    assert hs.export is EXPORTS["view"] and not hs.block_size_requested


def test_info_does_not_finish_and_unknown_export_is_an_error_reply() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    out = hs.receive(CLIENT_FLAGS + nbd.encode_go("replica", option=Opt.INFO) + nbd.encode_go("nope"))
    replies = option_replies(out)
    assert replies[-1][:2] == (Opt.GO, Rep.ERR_UNKNOWN)
    assert replies[-2][:2] == (Opt.INFO, Rep.ACK)
    assert hs.export is None and not hs.finished


def test_structured_reply_refused_politely_then_go_works() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    out = hs.receive(CLIENT_FLAGS + nbd.encode_option(Opt.STRUCTURED_REPLY) + nbd.encode_option(99, b"xyz"))
    refused = [(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP), (99, Rep.ERR_UNSUP)]
    assert [r[:2] for r in option_replies(out)] == refused
    hs.receive(nbd.encode_go("replica"))
    assert hs.export is EXPORTS["replica"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\x00\x00\x09view\x00\x00",  # name longer than the option
        b"\x00\x00\x00\x04view\x00\x02\x00\x03",  # two info requests announced, one sent
        b"\x00\x00\x00\x02\xff\xfe\x00\x00",  # name not UTF-8
    ],
)
def test_malformed_go_gets_err_invalid(body: bytes) -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    out = hs.receive(CLIENT_FLAGS + nbd.encode_option(Opt.GO, body))
    assert option_replies(out) and option_replies(out)[0][1] == Rep.ERR_INVALID
    assert not hs.finished


def test_list_with_data_is_invalid() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    out = hs.receive(CLIENT_FLAGS + nbd.encode_option(Opt.LIST, b"x"))
    assert option_replies(out)[0][1] == Rep.ERR_INVALID


def test_export_name_pads_unless_no_zeroes() -> None:
    for flags, expected_len in (
        (nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES, 10),
        (nbd.FLAG_C_FIXED_NEWSTYLE, 134),
    ):
        hs = nbd.ServerHandshake(EXPORTS)
        out = hs.receive(struct.pack(">I", flags) + nbd.encode_option(Opt.EXPORT_NAME, b"view"))
        assert len(out) == expected_len
        assert struct.unpack(">QH", out[:10]) == (SIZE, nbd.DEFAULT_TRANSMISSION_FLAGS)
        assert hs.export is EXPORTS["view"]


def test_abort_acks_and_finishes() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    out = hs.receive(CLIENT_FLAGS + nbd.encode_option(Opt.ABORT))
    assert option_replies(out) == [(Opt.ABORT, Rep.ACK, b"")]
    assert hs.aborted and hs.finished


@pytest.mark.parametrize(
    "stream",
    [
        struct.pack(">I", 0x80),  # unknown client flag
        CLIENT_FLAGS + b"NOTMAGIC" + bytes(8),  # bad option magic
        CLIENT_FLAGS + nbd.encode_option(Opt.EXPORT_NAME, b"unknown"),  # cannot be answered: close
        CLIENT_FLAGS + nbd.encode_option(Opt.EXPORT_NAME, b"\xff"),
    ],
)
def test_fatal_handshake_errors(stream: bytes) -> None:
    with pytest.raises(nbd.HandshakeError):
        nbd.ServerHandshake(EXPORTS).receive(stream)


def test_overlong_option_is_skipped_and_refused() -> None:
    hs = nbd.ServerHandshake(EXPORTS)
    length = nbd.MAX_OPTION_LENGTH + 10
    out = hs.receive(CLIENT_FLAGS + struct.pack(">QII", nbd.IHAVEOPT, Opt.INFO, length))
    assert out == b""
    out = hs.receive(bytes(length - 3)) + hs.receive(bytes(3) + nbd.encode_go("view"))
    replies = option_replies(out)
    assert replies[0][:2] == (Opt.INFO, Rep.ERR_TOO_BIG)
    assert hs.export is EXPORTS["view"]


def test_parser_yields_requests_across_arbitrary_splits() -> None:
    stream = (
        nbd.encode_request(Cmd.WRITE, 1, 4096, 8)
        + b"ABCDEFGH"
        + nbd.encode_request(Cmd.READ, 2, 0, 512)
        + nbd.encode_request(Cmd.FLUSH, 3)
    )
    for split in range(1, len(stream)):
        parser = nbd.RequestParser()
        got = []
        for chunk in (stream[:split], stream[split:]):
            parser.feed(chunk)
            got.extend(parser)
        assert [(r.command, r.cookie, r.offset, r.length, r.payload) for r in got] == [
            (Cmd.WRITE, 1, 4096, 8, b"ABCDEFGH"),
            (Cmd.READ, 2, 0, 512, None),
            (Cmd.FLUSH, 3, 0, 0, None),
        ]
        assert parser.buffered == 0


@given(
    st.lists(st.tuples(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.TRIM]), st.integers(0, 3000)), max_size=20),
    st.lists(st.integers(1, 200), min_size=1, max_size=10),
)
def test_parser_round_trip_property(requests: list[tuple[int, int]], chunk_sizes: list[int]) -> None:
    stream = bytearray()
    expected = []
    for cookie, (command, length) in enumerate(requests):
        payload = bytes([cookie % 256]) * length if command == Cmd.WRITE else None
        stream += nbd.encode_request(command, cookie, cookie * 512, length) + (payload or b"")
        expected.append((command, cookie, cookie * 512, length, payload))
    parser = nbd.RequestParser()
    got = []
    pos = 0
    i = 0
    while pos < len(stream):
        size = chunk_sizes[i % len(chunk_sizes)]
        parser.feed(bytes(stream[pos : pos + size]))
        pos += size
        i += 1
        got.extend((r.command, r.cookie, r.offset, r.length, r.payload) for r in parser)
    assert got == expected


def test_oversized_write_payload_is_discarded_streaming() -> None:
    parser = nbd.RequestParser(max_payload=4096)
    parser.feed(nbd.encode_request(Cmd.WRITE, 9, 0, 10000) + bytes(100))
    request = parser.next_request()
    assert request is not None and request.oversized and request.payload is None
    assert nbd.check_request(request, SIZE) == nbd.EINVAL
    parser.feed(bytes(9900 - 5))
    assert parser.next_request() is None and parser.buffered == 0
    parser.feed(bytes(5) + nbd.encode_request(Cmd.READ, 10, 0, 512))
    follow = parser.next_request()
    assert follow is not None and (follow.command, follow.cookie) == (Cmd.READ, 10)


def test_bad_request_magic_is_fatal() -> None:
    parser = nbd.RequestParser()
    parser.feed(b"\x00" * 28)
    with pytest.raises(nbd.TransmissionError):
        parser.next_request()


@pytest.mark.parametrize(
    ("command", "flags", "offset", "length", "error"),
    [
        (Cmd.READ, 0, 0, 512, 0),
        (Cmd.READ, 0, SIZE - 512, 512, 0),
        (Cmd.READ, 0, SIZE - 512, 1024, nbd.EINVAL),
        (Cmd.READ, 0, SIZE, 0, 0),
        (Cmd.READ, 0, 2**64 - 512, 1024, nbd.EINVAL),  # offset + length overflows 64 bits
        (Cmd.WRITE, 0, SIZE - 512, 1024, nbd.ENOSPC),
        (Cmd.WRITE, 0, 2**64 - 512, 1024, nbd.ENOSPC),
        (Cmd.WRITE_ZEROES, 0, SIZE, 512, nbd.ENOSPC),
        (Cmd.TRIM, 0, SIZE, 512, nbd.EINVAL),
        (Cmd.WRITE, 0, 100, 512, nbd.EINVAL),  # misaligned
        (Cmd.READ, 0, 0, 100, nbd.EINVAL),
        (Cmd.WRITE, nbd.CMD_FLAG_FUA, 0, 512, 0),
        (Cmd.WRITE, nbd.CMD_FLAG_NO_HOLE, 0, 512, nbd.EINVAL),  # flag not valid for WRITE
        (Cmd.WRITE_ZEROES, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA, 0, 512, 0),
        (Cmd.WRITE_ZEROES, nbd.CMD_FLAG_FAST_ZERO, 0, 512, nbd.EINVAL),  # not negotiated
        (Cmd.READ, nbd.CMD_FLAG_DF, 0, 512, nbd.EINVAL),  # not negotiated
        (Cmd.FLUSH, 0, 0, 0, 0),
        (Cmd.FLUSH, 0, 512, 0, nbd.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 0, 512, nbd.EINVAL),
        (Cmd.CACHE, 0, 0, 512, nbd.EINVAL),
        (77, 0, 0, 512, nbd.EINVAL),
        (Cmd.READ, 0, 0, nbd.MAX_PAYLOAD + 512, nbd.EINVAL),
    ],
)
def test_check_request(command: int, flags: int, offset: int, length: int, error: int) -> None:
    request = nbd.Request(flags, command, 1, offset, length, b"" if command == Cmd.WRITE else None)
    assert nbd.check_request(request, SIZE) == error


def test_byte_granular_requests_allowed_with_min_block_1() -> None:
    request = nbd.Request(0, Cmd.WRITE, 1, 3, 100, bytes(100))
    assert nbd.check_request(request, SIZE, min_block=1) == 0
    assert nbd.check_request(request, SIZE) == nbd.EINVAL


def test_simple_reply_round_trip() -> None:
    assert nbd.decode_simple_reply(nbd.simple_reply(0xDEADBEEF12345678, nbd.ENOSPC)) == (
        nbd.ENOSPC,
        0xDEADBEEF12345678,
    )
