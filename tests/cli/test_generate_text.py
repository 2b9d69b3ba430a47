"""`moe generate` on folders with a Hugging Face tokenizer: the prompt goes through tokenizer.json,
the output comes back as text and stops at the folder's end token, `--chat` (and only it) applies
the chat template; a folder without tokenizer.json stays byte-level."""

import json
import shutil

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers", reason="text generation needs tokenizers (pip install -e '.[hf]')")

from moe import ModelConfig, MoEConfig, Transformer  # noqa: E402
from moe.cli import main  # noqa: E402
from moe.generate import decode, generate  # noqa: E402
from moe.io.hf import save_hf  # noqa: E402
from moe.io.tokenizer import load_tokenizer  # noqa: E402

SPECIAL = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "red", "big", "hat"]
VOCAB = ["[UNK]", *SPECIAL, *WORDS]  # 17 ids
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPT = "the cat sat"


def word_tokenizer(bos: bool = True) -> "tokenizers.Tokenizer":
    """A word-level tokenizer (whitespace split, decoded with spaces), built here: no download."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    if bos:  # like Llama's: <s> in front of every encoded text
        tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def tiny_model(vocab_size: int) -> Transformer:
    config = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=16),
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():  # sharper than the default init: greedy choices far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.3)
    return model


def hf_folder(path, **tokenizer_files):
    """A Hugging Face folder (Mixtral layout) with tokenizer.json and tokenizer_config.json."""
    save_hf(tiny_model(len(VOCAB)), path)
    return Transformer.from_hf(path), write_tokenizer(path, **tokenizer_files)


def write_tokenizer(path, chat_template=CHAT_TEMPLATE, eos_token="</s>", bos=True):
    tok = word_tokenizer(bos)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": eos_token, "special": True}}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def cli(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.removesuffix("\n")


def greedy(model, ids, n):
    return generate(model, torch.tensor([ids]), n, temperature=0)[0, len(ids) :].tolist()


def test_the_prompt_goes_through_tokenizer_json_and_the_output_is_text_up_to_the_end_token(tmp_path, capsys):
    model, tok = hf_folder(tmp_path)
    prompt_ids = tok.encode(PROMPT).ids
    assert prompt_ids == [1, 5, 6, 7]  # <s> the cat sat: the tokenizer's ids, not bytes
    new = greedy(model, prompt_ids, 8)
    # The end token: the first generated id not already generated before it, so the stop is visible.
    stop = next(j for j in range(1, len(new)) if new[j] not in new[:j])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [new[stop], 999]}))

    out = cli(capsys, "--ckpt", tmp_path, "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 8)

    assert out == tok.decode(prompt_ids + new[:stop], skip_special_tokens=True)
    assert out.startswith(PROMPT + " ")  # the prompt round-trips as text
    assert len(out.split()) == len(PROMPT.split()) + stop  # every word a token; the stop token is not printed


def test_the_end_token_of_tokenizer_config_stops_generation_without_generation_config(tmp_path):
    model, tok = hf_folder(tmp_path)
    new = greedy(model, tok.encode(PROMPT).ids, 8)
    stop = next(j for j in range(1, len(new)) if new[j] not in new[:j])
    write_tokenizer(tmp_path, eos_token=VOCAB[new[stop]])
    loaded = load_tokenizer([tmp_path])
    assert loaded.eos_ids == (new[stop],)
    assert loaded.until_eos(new) == new[:stop]


def test_the_chat_template_applies_with_chat_only(tmp_path, capsys):
    model, tok = hf_folder(tmp_path)
    rendered = "<s><|user|> the cat sat <|assistant|>"
    chat_ids = tok.encode(rendered, add_special_tokens=False).ids
    assert load_tokenizer([tmp_path]).encode(PROMPT, chat=True) == chat_ids == [1, 3, 5, 6, 7, 4]
    plain_ids = tok.encode(PROMPT).ids

    chat = cli(capsys, "--ckpt", tmp_path, "--prompt", PROMPT, "--chat", "--temperature", 0, "--max-new-tokens", 5)
    plain = cli(capsys, "--ckpt", tmp_path, "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 5)

    eos = load_tokenizer([tmp_path]).until_eos
    assert chat == tok.decode(eos(greedy(model, chat_ids, 5)), skip_special_tokens=True)  # the reply alone
    assert plain == tok.decode(plain_ids + eos(greedy(model, plain_ids, 5)), skip_special_tokens=True)
    assert plain.startswith(PROMPT)


def test_a_converted_checkpoint_with_the_tokenizer_files_uses_them(tmp_path, capsys):
    """Our own checkpoint folder (what `moe convert` writes, tokenizer files carried across)."""
    model, tok = hf_folder(tmp_path / "hf")
    model.save_pretrained(tmp_path / "ours")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "hf" / name, tmp_path / "ours" / name)
    ours = cli(capsys, "--ckpt", tmp_path / "ours", "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 4)
    hf = cli(capsys, "--ckpt", tmp_path / "hf", "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 4)
    assert ours == hf and ours.startswith(PROMPT)


def test_a_folder_without_a_tokenizer_stays_byte_level(tmp_path, capsys):
    model = tiny_model(256)
    model.save_pretrained(tmp_path)
    prompt = "déf "
    out = cli(capsys, "--ckpt", tmp_path, "--prompt", prompt, "--max-new-tokens", 12, "--seed", 3)
    ids = torch.tensor([list(prompt.encode("utf-8"))])
    expected = generate(model, ids, 12, 0.8, None, torch.Generator().manual_seed(3))
    assert out == decode(expected[0].tolist())  # sampled exactly as before: same ids, same bytes
    assert load_tokenizer([tmp_path]) is None
