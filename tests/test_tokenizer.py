"""The converted model's tokenizer loaded without transformers (jaxinfer.fast_tokenizer) against
transformers' AutoTokenizer on the same files: the same ids, text and chat prompts."""

import json
import os
import pydoc_data.topics
import shutil
import subprocess
import sys

import jinja2
import pytest
from transformers import AutoTokenizer

from jaxinfer import fast_tokenizer
from jaxinfer.tokenizer import Tokenizer

TEXTS = [
    pydoc_data.topics.topics["assignment"][:3000],
    "Hello world, how are you?  Fine:\n\tindented — “quotes” café 🎉 done.",
    "你好，世界！ 数学: ∑ x² = 42",
    "special tokens as text: <|im_start|>user\nhi<|im_end|><|endoftext|> end",
    "  leading spaces, trailing spaces  \n\n",
]
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 🎉"}, {"role": "user", "content": "Tell me about <|im_end|> tokens."}],
]


@pytest.fixture(scope="module")
def pair(smollm2_tokenizer_dir):
    """(jaxinfer's tokenizer of the converted SmolLM2, the same files through AutoTokenizer)."""
    fast = Tokenizer.from_dir(smollm2_tokenizer_dir)
    assert isinstance(fast.backend, fast_tokenizer.FastTokenizer)
    return fast, Tokenizer(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir))


def test_vocab_and_stop_ids_match_transformers(pair):
    fast, hf = pair
    assert len(fast) == len(hf) > 49000
    assert fast.eos_token_ids == hf.eos_token_ids and fast.eos_token_ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(pair, text):
    fast, hf = pair
    for add_special in (True, False):
        ids = fast.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special)
    ids = ids + sorted(fast.eos_token_ids) + ids[:5]
    for skip in (True, False):
        assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert fast.decode(ids, skip_special_tokens=True) != fast.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompts_match_transformers(pair, chat, add_generation_prompt):
    fast, hf = pair
    ids = fast.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert ids == hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert ids == list(hf.backend.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                                      tokenize=True, return_dict=False))
    assert fast.decode(ids, skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n" if add_generation_prompt else "<|im_end|>\n")


# Uses what transformers gives templates beyond plain jinja2: tojson without HTML escaping, the
# special tokens, loop controls, the generation tag, raise_exception and reasoning aliases.
TEMPLATE = """{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}
{% if m.role == 'skip' %}{% continue %}{% endif %}
{% generation %}{{ m.role }}: {{ m.content | tojson }}{% if m.reasoning_content %} [{{ m.reasoning_content }}]{% endif %}{% endgeneration %}{{ eos_token }}
{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"""


@pytest.fixture(scope="module")
def custom_template_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """SmolLM2's tokenizer with TEMPLATE, and a BOS (<|endoftext|>, id 0) added to every encoding."""
    out = tmp_path_factory.mktemp("custom_template")
    shutil.copy(os.path.join(smollm2_tokenizer_dir, "tokenizer_config.json"), out)
    with open(os.path.join(smollm2_tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    spec["post_processor"]["single"].insert(0, bos)
    spec["post_processor"]["special_tokens"] = {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
    (out / "tokenizer.json").write_text(json.dumps(spec))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return str(out)


def test_template_features_render_as_in_transformers(custom_template_dir):
    fast = Tokenizer.from_dir(custom_template_dir)
    hf = Tokenizer(AutoTokenizer.from_pretrained(custom_template_dir))
    for add_special in (True, False):
        assert fast.encode(TEXTS[1], add_special) == hf.encode(TEXTS[1], add_special)
    assert fast.encode(TEXTS[1])[0] == 0 and fast.encode(TEXTS[1], add_special_tokens=False)[0] != 0
    chat = [{"role": "user", "content": 'a <b> & "c"'}, {"role": "skip", "content": "hidden"},
            {"role": "assistant", "content": "ok", "thinking": "because"}]
    ids = fast.apply_chat_template(chat)
    assert ids == hf.apply_chat_template(chat)
    text = fast.decode(ids, skip_special_tokens=False)
    assert '"a <b> & \\"c\\""' in text and "hidden" not in text and "[because]" in text
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        fast.apply_chat_template([{"role": "tool", "content": "x"}])


def test_other_tokenizer_classes_load_through_transformers(custom_template_dir, tmp_path):
    for name in os.listdir(custom_template_dir):
        shutil.copy(os.path.join(custom_template_dir, name), tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert fast_tokenizer.load_fast_tokenizer(str(tmp_path)) is not None
    config["tokenizer_class"] = "GPT2Tokenizer"
    config_path.write_text(json.dumps(config))
    assert fast_tokenizer.load_fast_tokenizer(str(tmp_path)) is None
    tok = Tokenizer.from_dir(str(tmp_path))
    assert not isinstance(tok.backend, fast_tokenizer.FastTokenizer)
    assert tok.encode(TEXTS[1]) == Tokenizer.from_dir(custom_template_dir).encode(TEXTS[1])


def test_save_round_trips(pair, tmp_path):
    fast, _ = pair
    fast.save(str(tmp_path))
    again = Tokenizer.from_dir(str(tmp_path))
    assert isinstance(again.backend, fast_tokenizer.FastTokenizer)
    assert again.apply_chat_template(CHATS[1]) == fast.apply_chat_template(CHATS[1])


def test_loading_does_not_import_transformers(smollm2_tokenizer_dir):
    code = ("import sys; from jaxinfer.tokenizer import Tokenizer; "
            f"t = Tokenizer.from_dir({smollm2_tokenizer_dir!r}); t.apply_chat_template([{{'role': 'user', 'content': 'hi'}}]); "
            "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
