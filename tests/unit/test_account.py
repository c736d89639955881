"""Token usage read from the tail of a response."""

from corral.pipeline.account import usage_from_tail


def test_native_final_chunk() -> None:
    tail = (b'{"model":"m","response":"x","done":false}\n'
            b'{"model":"m","done":true,"prompt_eval_count":26,"eval_count":259}\n')
    u = usage_from_tail(tail, openai=False, chunks=2)
    assert u is not None and (u.tokens_in, u.tokens_out, u.exact) == (26, 259, True)
    assert u.service == 26 + 2 * 259


def test_openai_usage_last_wins() -> None:
    tail = (b'data: {"usage":{"prompt_tokens":0,"completion_tokens":0}}\n\n'
            b'data: {"usage":{"prompt_tokens":7,"completion_tokens":9}}\n\ndata: [DONE]\n\n')
    u = usage_from_tail(tail, openai=True, chunks=6)
    assert u is not None and (u.tokens_in, u.tokens_out) == (7, 9)


def test_counts_streamed_chunks_without_usage() -> None:
    u = usage_from_tail(b'data: {"choices":[]}\n\n', openai=True, chunks=12)
    assert u is not None and not u.exact and u.tokens_out > 0


def test_cost_estimate_reads_text_not_images() -> None:
    from corral.pipeline.inference import estimate_cost

    text = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}]}
    with_image = {"model": "m", "messages": [
        {"role": "user", "content": "x" * 400, "images": ["A" * 1_000_000]}]}
    assert estimate_cost("/api/chat", text, 500) == estimate_cost(
        "/api/chat", with_image, 1_000_500)
    assert estimate_cost("/api/chat", text, 500) == 100 + 2 * 256
    openai_parts = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "y" * 40},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "B" * 9999}}]}]}
    assert estimate_cost("/v1/chat/completions", openai_parts, 10_100) == 10 + 20
    assert estimate_cost("/api/embed", {"model": "m", "input": ["abcd", "efgh"]}, 60) == 2
