"""A small real tokenizer for the tests: a byte-level BPE trained with the
`tokenizers` library on a few sentences (vocabulary < 256, so it fits the
`tiny` model), saved as a Hugging Face checkpoint saves one: tokenizer.json
(its post-processor adds <s>) and tokenizer_config.json (special tokens and a
ChatML-like chat template)."""

import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = ['The quick brown fox jumps over the lazy dog.', 'Hello world! How are you today?',
          'Mixture of experts models route tokens to experts.',
          'STOP here. The end.\n\nNew paragraph: é ü ß 日本', 'You route tokens.'] * 20
SPECIAL = ['<s>', '</s>', '<unk>', '<|im_start|>', '<|im_end|>']
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_bpe(folder, vocab_size=200, chat_template=CHAT_TEMPLATE, **config):
    """Train and save the tokenizer in ``folder`` (a pathlib.Path or str);
    tokenizer_config.json has ``chat_template`` (unless None) and the keys
    ``config`` adds or replaces; -> folder (a pathlib.Path)."""
    folder = pathlib.Path(folder)
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / 'tokenizer.json'))
    config = {'bos_token': '<s>', 'eos_token': '</s>', 'unk_token': '<unk>',
              **({} if chat_template is None else {'chat_template': chat_template}),
              'tokenizer_class': 'PreTrainedTokenizerFast', **config}
    (folder / 'tokenizer_config.json').write_text(json.dumps(config))
    return folder


if __name__ == '__main__':          # the README's weights/tiny-tokenizer: python tests/bpe.py DIR
    import sys
    write_bpe(sys.argv[1])
