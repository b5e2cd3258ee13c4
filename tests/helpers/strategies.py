"""Hypothesis strategies for the codec's events: integers of each wire
width, texts, batches, and events either side (or only one side) may send.
Shared by tests/test_codec.py and tests/test_fuzz_codec.py."""

from __future__ import annotations

import attrs
from hypothesis import strategies as st

from pybroker.protocol import (
    PROTOCOL_VERSION,
    Credit,
    Deliver,
    Durability,
    Error,
    ErrorCode,
    Hello,
    Ping,
    Pong,
    PubAck,
    Publish,
    RefKind,
    StartKind,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Welcome,
    encode_batch,
)

U8 = st.integers(0, 2**8 - 1)
U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
texts = st.text(st.characters(codec="utf-8"), max_size=24)
str_maps = st.dictionaries(texts, texts, max_size=4)
int_maps = st.dictionaries(texts, U64, max_size=4)
payloads = st.binary(max_size=64)
batches = st.one_of(
    st.binary(max_size=64),
    st.lists(
        st.one_of(
            payloads, st.tuples(payloads, st.dictionaries(texts.filter(bool), texts, max_size=3))
        ),
        min_size=1,
        max_size=5,
    ).map(encode_batch),
)
errors = st.builds(
    Error,
    code=st.one_of(st.sampled_from(ErrorCode), U16),
    message=st.text(st.characters(codec="utf-8"), max_size=200),
    ref=U64,
    ref_kind=st.sampled_from(RefKind),
    fatal=st.booleans(),
)
hellos = st.builds(Hello, client_name=texts, version=st.just(PROTOCOL_VERSION), options=str_maps)
welcomes = st.builds(
    Welcome, server_version=texts, server_name=texts, limits=int_maps, version=st.just(1)
)
either_events = st.one_of(
    st.builds(Ping, U64),
    st.builds(Pong, U64),
    errors.map(lambda e: attrs.evolve(e, fatal=False)),
)
client_events = st.one_of(
    st.builds(Publish, U64, texts, batches),
    st.builds(
        Subscribe,
        sub_id=U32,
        pattern=texts,
        start=st.one_of(st.sampled_from(StartKind), U8),
        start_value=U64,
        credit=U32,
        options=str_maps,
    ),
    st.builds(Unsubscribe, U32),
    st.builds(Credit, U32, U32),
    either_events,
)
server_events = st.one_of(
    st.builds(PubAck, U64, U64, U32, U64, st.sampled_from(Durability)),
    st.builds(SubAck, U32),
    st.builds(UnsubAck, U32),
    st.builds(Deliver, U32, texts, U64, U64, batches),
    either_events,
)
