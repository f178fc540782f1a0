"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: a client counts a prompt's tokens (a
chat's as the chat route renders it, tools and template fields included) or reads ids back as
text, with the served model's tokenizer, without generating."""

from fastapi import Request

from berth.runtime.server.body import parse_body
from berth.runtime.server.chat import render_chat
from berth.runtime.server.errors import invalid_request
from berth.runtime.server.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from berth.runtime.server.sampling import check_supported

_CHAT_ONLY = ("tools", "add_generation_prompt", "continue_final_message", "chat_template_kwargs")


async def tokenize(raw: Request) -> TokenizeResponse:
    """The prompt's token ids (and their count), or the rendered chat's."""
    from berth.runtime.server.app import get_server

    server = get_server(raw)
    request = await parse_body(raw, TokenizeRequest, server.settings)
    model = server.loaded(request.model or server.model_name)
    if (request.prompt is None) == (request.messages is None):
        raise invalid_request("prompt: give a prompt or messages (one of them).", param="prompt")
    if request.messages is None:
        for name in _CHAT_ONLY:
            if getattr(request, name) is not None:
                raise invalid_request(f"{name}: only with messages.", param=name)
        prompt = request.prompt or ""
        add = request.add_special_tokens is not False
        ids = (await model.encoder.encode([prompt], add_special_tokens=add))[0]
    else:
        if request.add_special_tokens is not None:
            raise invalid_request(
                "add_special_tokens: only with prompt (a chat's tokens are those the chat "
                "template renders).",
                param="add_special_tokens",
            )
        chat = ChatCompletionRequest(
            model=server.model_name,
            messages=request.messages,
            tools=request.tools,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=request.chat_template_kwargs,
        )
        ids, _, _ = await render_chat(chat, check_supported(chat), model)
    strs = None
    if request.return_token_strs:
        spell = model.tokenizer.hf.id_to_token
        strs = [spell(i) or "" for i in ids]
    return TokenizeResponse(
        count=len(ids), max_model_len=model.max_model_len, tokens=ids, token_strs=strs
    )


async def detokenize(raw: Request) -> DetokenizeResponse:
    """The text of the token ids (special tokens left out, as in an answer)."""
    from berth.runtime.server.app import get_server

    server = get_server(raw)
    request = await parse_body(raw, DetokenizeRequest, server.settings)
    model = server.loaded(request.model or server.model_name)
    vocab = model.tokenizer.vocab_size
    for i, token in enumerate(request.tokens):
        if token >= vocab:
            param = f"tokens.{i}"
            raise invalid_request(
                f"{param}: {token} is not a token id of this model's vocabulary [0, {vocab}).",
                param=param,
            )
    return DetokenizeResponse(prompt=model.tokenizer.decode(request.tokens))
