"""The decoding of what the Lua functions answer: a lean function's kept JSON text reads as
``json.loads`` reads it, whatever stands under the call id."""

from __future__ import annotations

import json

import pytest

from enhanced_locking.backends import redis_replies

TOOK = '["took",7,1733380000000,0]'


def test_a_kept_answer_reads_the_same_with_whitespace_around_it() -> None:
    plain = redis_replies.acquire(TOOK)
    assert plain == redis_replies.Took("7", "1733380000000", "0")
    assert redis_replies.acquire(f" \n{TOOK} ") == plain


@pytest.mark.parametrize("text", [f"{TOOK} more", "", "not json", "[1,"])
def test_a_kept_text_that_is_not_one_json_value_raises_json_s_own_error(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as caught:
        redis_replies.acquire(text)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    assert str(caught.value) == str(expected.value)


async def test_in_a_coroutine_it_is_the_same_error_not_a_runtime_error() -> None:
    async def decode() -> object:
        return redis_replies.release(" not json")

    with pytest.raises(json.JSONDecodeError):
        await decode()
