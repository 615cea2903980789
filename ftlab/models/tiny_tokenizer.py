"""A tiny ByteLevel-BPE tokenizer shipped with ftlab, so tests and tiny models never touch the hub.

It mirrors SmolLM2's tokenizer in everything that matters to the training code (special tokens
``<|endoftext|>`` / ``<|im_start|>`` / ``<|im_end|>`` at ids 0/1/2, digits split one by one,
byte-level fallback so any text encodes, a ChatML chat template), with a ~1000-token vocabulary
so a tiny model's embedding stays small.

``python -m ftlab.models.tiny_tokenizer`` rebuilds ``ftlab/assets/tiny_tokenizer/``. The build is
deterministic: the corpus comes from a seeded generator defined here, and BPE training is
single-threaded with a sorted word list, so rebuilding gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

from ftlab.models.chat_templates import CHATML

TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "tiny_tokenizer"
VOCAB_SIZE = 1000
SEED = 0

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2 as in SmolLM2

CHAT_TEMPLATE = CHATML  # SmolLM2's ChatML template without its default system prompt

_WORDS = """
the be to of and a in that have I it for not on with he as you do at this but his by from they we
say her she or an will my one all would there their what so up out if about who get which go me
when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first well
way even new want because any these give day most us is are was were has had been being does did
number numbers answer question sum difference product quotient plus minus times divided equals
add subtract multiply divide count letters letter word words sentence reverse sort spell first
last longest shortest vowel vowels consonant list item items result total value even odd larger
smaller bigger greater less more than between next previous before after order alphabetical
apple banana cherry grape lemon mango orange peach pear plum berry melon house tree river mountain
cat dog bird fish horse mouse rabbit sheep cow lion tiger bear wolf fox snake frog duck goat
red green blue yellow black white brown purple pink gray small big long short happy sad fast slow
hot cold warm cool old young new bright dark light heavy easy hard early late quick quiet loud
book table chair door window road car train ship plane city town school garden water fire earth
air sun moon star sky rain snow wind cloud stone paper pencil music song story game friend family
mother father sister brother child children man woman boy girl teacher student doctor king queen
run walk jump read write sing play eat drink sleep open close find keep hold turn start stop
help ask tell show call try leave put mean begin seem feel become bring live stand learn change
please thanks thank hello yes no maybe true false correct wrong right left step steps solve
system user assistant explain because therefore so first second third then finally here
zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand
""".split()

_TEMPLATES = [
    "What is {a} + {b}?",
    "What is {a} - {b}?",
    "What is {a} * {b}?",
    "Compute {a} plus {b}.",
    "Subtract {b} from {a}.",
    "Multiply {a} by {b}.",
]


def _arith(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 99)
    i = rng.randrange(len(_TEMPLATES))
    result = [a + b, a - b, a * b, a + b, a - b, a * b][i]
    question = _TEMPLATES[i].format(a=a, b=b)
    answer = rng.choice([f"{result}", f"The answer is {result}.", f"{a} and {b} give {result}."])
    return question, answer


def _word_task(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, k=rng.randint(2, 5))
    w = words[0]
    kind = rng.randrange(6)
    if kind == 0:
        return f"Reverse the word '{w}'.", w[::-1]
    if kind == 1:
        return f"Sort these words: {', '.join(words)}.", ", ".join(sorted(words, key=str.lower))
    if kind == 2:
        return f'How many letters are in "{w}"?', f"There are {len(w)} letters."
    if kind == 3:
        return f"Spell {w} in capitals!", w.upper()
    if kind == 4:
        return f"Which word is longest: {'; '.join(words)}?", max(words, key=len)
    sentence = " ".join(rng.sample(_WORDS, k=rng.randint(4, 10))).capitalize()
    return f"Write a sentence with {w}.", sentence + "."


def corpus(n: int = 6000, seed: int = SEED) -> Iterator[str]:
    """Deterministic training text: arithmetic and word tasks in plain and chat-like layouts."""
    rng = random.Random(seed)
    yield " ".join(_WORDS)
    yield " ".join(w.capitalize() for w in _WORDS)
    yield "0123456789 .,;:!?'\"()[]{}<>+-*/=%#&@$_|\\~^` \n\t"
    for _ in range(n):
        q, a = (_arith if rng.random() < 0.5 else _word_task)(rng)
        if rng.random() < 0.5:
            yield f"system\nYou are a helpful assistant.\nuser\n{q}\nassistant\n{a}\n"
        else:
            yield f"Question: {q}\nAnswer: {a}"


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """Train the BPE model and wrap it as a transformers fast tokenizer with the chat template."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread: deterministic merges
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # same pre-tokenization as SmolLM2: every digit its own token, then GPT-2 byte-level split
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _portable_class_name(config_path: Path) -> None:
    """transformers 5 writes ``TokenizersBackend``, which 4.x cannot resolve; the old alias
    ``PreTrainedTokenizerFast`` loads the same tokenizer.json in both."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args(argv)
    tok = build_tokenizer()
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(args.out)
    _portable_class_name(args.out / "tokenizer_config.json")
    print(f"wrote {len(tok)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
