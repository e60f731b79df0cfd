"""Prompt formatting in one place: chat template or plain text to token ids, demonstrations
that end the turn as the model would, stop tokens, and clear errors."""

import pytest
from transformers import AutoTokenizer

from orchestrator.config import PromptConfig
from orchestrator.prompts import PromptError, PromptFormatter

Q = {"id": "q1", "prompt": "What is 2+2?", "answer": "4", "topic": "sums"}


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_model):
    return AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="module")
def plain_tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_chat_prompt_is_the_templates_token_ids(chat_tok):
    fmt = PromptFormatter(chat_tok, PromptConfig(system="Be brief."))
    assert fmt.chat
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2+2?"}]
    expected = chat_tok.apply_chat_template(messages, add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    assert fmt.prompt_ids(Q) == expected
    assert fmt.text(Q).endswith("<|im_start|>assistant\n")


def test_demonstrations_end_the_turn_and_turn_ends_stop_the_engine(chat_tok):
    fmt = PromptFormatter(chat_tok, PromptConfig(), extra_stop_ids=[7])
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != chat_tok.eos_token_id  # like Qwen2.5's base models
    assert fmt.end_of_turn == im_end
    assert fmt.stop_token_ids == [im_end, chat_tok.eos_token_id, 7]
    assert fmt.completion_ids("4") == chat_tok("4", add_special_tokens=False).input_ids + [im_end]


def test_template_fields_kwargs_and_response_prefix(chat_tok, tmp_path):
    template = tmp_path / "think.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking %}<think>\n{% endif %}{% endif %}")
    cfg = PromptConfig(template="Topic: {topic}. {prompt} Put the answer last.",
                       chat_template=str(template), template_kwargs={"enable_thinking": True},
                       response_prefix="so, ")
    fmt = PromptFormatter(chat_tok, cfg)
    text = fmt.text(Q)
    assert "Topic: sums. What is 2+2? Put the answer last.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nso, ")
    # a demonstration that repeats the prefix the prompt already ends with loses it
    assert fmt.completion_ids("so, 4") == fmt.completion_ids("4")


def test_plain_prompts_match_the_tokenizer_as_before(plain_tok):
    fmt = PromptFormatter(plain_tok, PromptConfig())  # auto: no chat template -> plain
    r = {"id": "a", "prompt": "12+7="}
    assert not fmt.chat
    assert fmt.prompt_ids(r) == plain_tok("12+7=").input_ids  # BOS included
    assert fmt.completion_ids("91") == plain_tok("91", add_special_tokens=False).input_ids + \
        [plain_tok.eos_token_id]
    assert fmt.stop_token_ids == [plain_tok.eos_token_id]


def test_conversations_in_the_data(chat_tok, plain_tok):
    r = {"id": "c", "prompt": [{"role": "user", "content": "Hi"}]}
    fmt = PromptFormatter(chat_tok, PromptConfig(system="S"))
    assert fmt.messages(r) == [{"role": "system", "content": "S"},
                               {"role": "user", "content": "Hi"}]
    with pytest.raises(PromptError, match="needs a chat template"):
        PromptFormatter(plain_tok, PromptConfig()).text(r)


def test_errors_name_what_is_wrong(chat_tok, plain_tok):
    with pytest.raises(PromptError, match=r"prompt.template names \{level\}, which record 'q1'"):
        PromptFormatter(chat_tok, PromptConfig(template="{level}: {prompt}")).text(Q)
    with pytest.raises(PromptError, match="the tokenizer has no chat template"):
        PromptFormatter(plain_tok, PromptConfig(style="chat"))


def test_prompt_budget(chat_tok):
    fmt = PromptFormatter(chat_tok, PromptConfig(), max_prompt_tokens=40)
    short, long = dict(Q), dict(Q, id="q2", prompt="What is 2+2? " * 10)
    assert fmt.fits(short) and not fmt.fits(long)
    assert PromptFormatter(chat_tok, PromptConfig()).fits(long)
