"""`moe generate` against hostile tokenizer files, chat templates and flags: one line on stderr,
exit status 2, no traceback, nothing read that lies outside the model folder, no hang."""

import json
import os
import time

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers", reason="text generation needs tokenizers (pip install -e '.[hf]')")

from moe import ModelConfig, MoEConfig, Transformer  # noqa: E402
from moe.cli import main  # noqa: E402
from moe.io import tokenizer as tokenizer_module  # noqa: E402
from moe.io.hf import save_hf  # noqa: E402

WORDS = ["[UNK]", "<s>", "</s>", "hello", "world"]


def tiny(vocab_size):
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        moe=MoEConfig(num_experts=2, top_k=1, expert_ffn_size=8),
    )
    torch.manual_seed(0)
    return Transformer(config)


def word_tokenizer(words=WORDS):
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.fixture
def folder(tmp_path):
    """A Hugging Face folder with a valid tokenizer, for each test to spoil one file of."""
    path = tmp_path / "model"
    save_hf(tiny(len(WORDS)), path)
    word_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ x }}"}))
    return path


def error_of(capsys, *argv):
    code = main(["generate", "--max-new-tokens", "2", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def flag_error_of(capsys, *argv):
    """argparse refuses the flag: exit 2 and one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_the_valid_folder_works(folder, capsys):
    """The baseline every test below spoils one thing of."""
    assert main(["generate", "--ckpt", str(folder), "--prompt", "hello world", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("hello world")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"model": {"type": "WordLevel", "vocab": {', "tokenizer.json: malformed JSON"),
        ("[" * 100_000, "tokenizer.json: malformed JSON"),
        ('{"version": "1.0", "model": {"type": "NoSuchModel"}}', "not a tokenizer the tokenizers library reads"),
        (b"\xff\xfe{}", "tokenizer.json: not UTF-8 text"),
    ],
)
def test_a_malformed_tokenizer_json_is_one_line(folder, capsys, content, message):
    path = folder / "tokenizer.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert message in error_of(capsys, "--ckpt", folder, "--prompt", "hello")


def test_a_tokenizer_json_linking_out_of_the_folder_is_not_read(folder, capsys, tmp_path):
    outside = tmp_path / "secret.json"
    word_tokenizer().save(str(outside))  # a perfectly good tokenizer, but not the folder's
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(outside)
    err = error_of(capsys, "--ckpt", folder, "--prompt", "hello")
    assert "tokenizer.json: a symlink to" in err and "outside the folder" in err


def test_a_tokenizer_json_that_is_a_fifo_is_refused_without_waiting(folder, capsys):
    (folder / "tokenizer.json").unlink()
    os.mkfifo(folder / "tokenizer.json")
    start = time.monotonic()
    assert "not a regular file (a FIFO)" in error_of(capsys, "--ckpt", folder, "--prompt", "hello")
    assert time.monotonic() - start < 30


def test_a_huge_tokenizer_json_is_refused_before_it_is_read(folder, capsys):
    with open(folder / "tokenizer.json", "wb") as f:
        f.truncate(tokenizer_module.TOKENIZER_BYTES + 1)  # sparse: no disk used
    err = error_of(capsys, "--ckpt", folder, "--prompt", "hello")
    assert f"{tokenizer_module.TOKENIZER_BYTES + 1:,} bytes, more than" in err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("tokenizer_config.json", "{", "tokenizer_config.json: malformed JSON"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json: expected a JSON object, got list"),
        ("tokenizer_config.json", '{"eos_token": 7}', "'eos_token' = 7 is not a token"),
        ("tokenizer_config.json", '{"chat_template": 7}', "'chat_template' = 7 is not a template"),
        ("generation_config.json", '{"eos_token_id": "x"}', "'eos_token_id' = 'x' is not a token id"),
        ("generation_config.json", '{"eos_token_id": [1, -2]}', "'eos_token_id' = [1, -2] is not a token id"),
        ("generation_config.json", '{"eos_token_id": true}', "'eos_token_id' = True is not a token id"),
    ],
)
def test_malformed_companion_files_are_one_line(folder, capsys, name, content, message):
    (folder / name).write_text(content)
    assert message in error_of(capsys, "--ckpt", folder, "--prompt", "hello")


ESCAPES = {
    "class walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals of a function": "{{ raise_exception.__globals__['os'].system('touch pwned') }}",
    "template internals": "{{ self._TemplateReference__context.parent }}",
    "mutating the messages": "{{ messages.append({'role': 'system'}) }}",
    "mutating a dict": "{% set d = {} %}{{ d.update({'a': 1}) }}",
    "str.format attribute walk": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
    "power at compile time": "{{ 10 ** 10000000000 }}",
    "power at run time": "{% set n = 10 %}{{ n ** 100000000 }}",
    "repetition": "{{ 'x' * 10000000000 }}",
}


@pytest.mark.parametrize("template", ESCAPES.values(), ids=ESCAPES.keys())
def test_a_template_that_tries_to_escape_the_sandbox_is_one_line(folder, capsys, template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (folder / "chat_template.jinja").write_text(template)
    err = error_of(capsys, "--ckpt", folder, "--prompt", "hello", "--chat")
    assert "chat_template.jinja: the chat template failed: SecurityError" in err
    assert not (tmp_path / "pwned").exists()


def test_a_template_that_never_ends_is_stopped(folder, capsys, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "TEMPLATE_SECONDS", 0.5)
    loops = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    (folder / "chat_template.jinja").write_text(loops)
    start = time.monotonic()
    assert "ran longer than 0.5 s" in error_of(capsys, "--ckpt", folder, "--prompt", "hello", "--chat")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}", "renders more"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{{ raise_exception('this model has no user role') }}", "TemplateError: 'this model has no user role'"),
        ("{% for %}", "TemplateSyntaxError"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_a_template_that_fails_is_one_line(folder, capsys, template, message):
    (folder / "chat_template.jinja").write_text(template)
    assert message in error_of(capsys, "--ckpt", folder, "--prompt", "hello", "--chat")


def test_a_template_file_that_is_too_large_is_refused(folder, capsys):
    (folder / "chat_template.jinja").write_text("x" * (tokenizer_module.TEMPLATE_BYTES + 1))
    assert "more than" in error_of(capsys, "--ckpt", folder, "--prompt", "hello", "--chat")


def test_chat_without_a_template_or_a_tokenizer_is_one_line(folder, capsys, tmp_path):
    (folder / "tokenizer_config.json").write_text("{}")
    assert "--chat needs a chat template" in error_of(capsys, "--ckpt", folder, "--prompt", "hello", "--chat")
    byte_level = tmp_path / "bytes"
    tiny(256).save_pretrained(byte_level)
    assert "--chat needs the model folder's tokenizer.json" in error_of(
        capsys, "--ckpt", byte_level, "--prompt", "hello", "--chat"
    )


def test_a_prompt_of_no_tokens_is_one_line(folder, capsys, tmp_path):
    assert "encodes to no tokens" in error_of(capsys, "--ckpt", folder, "--prompt", "   ")
    byte_level = tmp_path / "bytes"
    tiny(256).save_pretrained(byte_level)
    assert "encodes to no tokens" in error_of(capsys, "--ckpt", byte_level, "--prompt", "")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_one_line(folder, capsys):
    word_tokenizer([*WORDS, "big"]).save(str(folder / "tokenizer.json"))
    err = error_of(capsys, "--ckpt", folder, "--prompt", "hello big")
    assert "prompt token id 5 is outside the vocabulary (vocab_size 5): not this model's tokenizer" in err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "nan", "must be 0 (greedy) or a finite number"),
        ("--temperature", "inf", "must be 0 (greedy) or a finite number"),
        ("--temperature", "-1", "must be 0 (greedy) or a finite number"),
        ("--temperature", "1e-40", "must be 0 (greedy) or a finite number"),
        ("--temperature", "warm", "not a number"),
        ("--top-k", "0", "must be a positive integer"),
        ("--top-k", "-1", "must be a positive integer"),
        ("--max-new-tokens", "-1", "must be an integer >= 0"),
        ("--max-new-tokens", "1" + "0" * 30, "must be at most 1,000,000"),
        ("--seed", "-1", "must be an integer >= 0"),
        ("--seed", str(2**64), "must be at most 2**63 - 1"),
        ("--seed", "1.5", "not an integer"),
    ],
)
def test_bad_flags_are_one_line(folder, capsys, flag, value, message):
    err = flag_error_of(capsys, "--ckpt", folder, "--prompt", "hello", flag, value)
    assert f"argument {flag}: {message}" in err
