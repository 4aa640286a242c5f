"""`rafale generate`: text from a trained decoder, streamed to the terminal.

    rafale generate runs/pythia-tiny-stories --prompt "Once upon a time"
    rafale generate runs/pythia-tiny-stories/export --prompt-file prompts.txt --temperature 0.8 --top-p 0.95

The model is a run folder (its latest checkpoint) or a Hugging Face model folder (e.g. a run's export/) of any decoder
family (Family.can_generate: GPT-NeoX / Pythia, Llama, Qwen2, Qwen3).
Greedy by default; --temperature > 0 samples, with --top-k / --top-p and a --seed. Decoding uses the KV cache
and stops at the end-of-text token. Several prompts are decoded as one left-padded batch.
"""

import argparse
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from rafale.errors import RafaleError, read_utf8
from rafale.data.tokenizers import special_token_ids
from rafale.models.families import FAMILIES


def load_decoder(path: Path):
    """(the Decoder in eval mode, tokenizer) from a run folder or a Hugging Face model folder."""
    if (path / "config.yaml").is_file():
        from rafale.run_folder import load_run_model

        cfg, data, model = load_run_model(path)
        from rafale.resolve import family_of

        if not family_of(cfg).can_generate:
            raise RafaleError(f"{path}: a {cfg.model.type} run cannot generate text; only decoders can "
                              f"({', '.join(f.name for f in FAMILIES.values() if f.can_generate)})")
        return model.shrink_vocab(data.vocab_size), data.tokenizer
    if (path / "config.json").is_file():
        from rafale.models.decoder import Decoder
        from rafale.models.hf import from_pretrained, load_tokenizer_from_folder

        model = from_pretrained(path, dtype=torch.float32)
        if not isinstance(model, Decoder):
            raise RafaleError(f"{path}: holds a {type(model).__name__}; only decoders (GPT-NeoX, Llama, Qwen2, Qwen3) can generate text")
        tokenizer = load_tokenizer_from_folder(path)
        if tokenizer is None:
            raise RafaleError(f"{path}: no tokenizer.json beside the weights")
        return model, tokenizer
    raise RafaleError(f"{path}: neither a rafale run folder (config.yaml) nor a model folder (config.json)")


def encode_prompts(prompts: list[str], tokenizer: Tokenizer, eos: int, pad: int):
    """Left-padded input_ids (B, T) and attention_mask; an empty prompt starts from end-of-text, as in training."""
    ids = [tokenizer.encode(p, add_special_tokens=False).ids or [eos] for p in prompts]
    T = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, T - len(seq):] = torch.tensor(seq)
        attention_mask[row, T - len(seq):] = 1
    return input_ids, attention_mask


def generate_text(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k=None, top_p=None, seed=None, stream=None) -> list[str]:
    """The continuation of each prompt (without the prompt), up to end-of-text.

    stream: a function given each new piece of text of a single prompt as it is decoded.
    """
    eos, pad = special_token_ids(tokenizer, "tokenizer")
    input_ids, attention_mask = encode_prompts(prompts, tokenizer, eos, pad)
    if input_ids.shape[1] + max_new_tokens > model.cfg.max_position_embeddings:
        raise RafaleError(
            f"the prompt ({input_ids.shape[1]} tokens) plus --max-new-tokens ({max_new_tokens}) is longer than the "
            f"model's context ({model.cfg.max_position_embeddings} tokens)"
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    new_ids: list[list[int]] = [[] for _ in prompts]
    shown = [""]

    def on_token(next_tokens):
        for row, token in enumerate(next_tokens.tolist()):
            if not new_ids[row] or new_ids[row][-1] != eos:
                new_ids[row].append(token)
        if stream is not None and len(prompts) == 1:
            text = tokenizer.decode([t for t in new_ids[0] if t != eos])
            if len(text) > len(shown[0]) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
                stream(text[len(shown[0]):])
                shown[0] = text

    model.generate(
        input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos,
        temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, on_token=on_token,
    )
    texts = [tokenizer.decode([t for t in ids if t != eos]) for ids in new_ids]
    if stream is not None and len(prompts) == 1 and len(texts[0]) > len(shown[0]):
        stream(texts[0][len(shown[0]):])  # what was held back: it stopped inside a UTF-8 character
    return texts


def generate_main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="rafale generate", description="Generate text with a trained decoder.",
        epilog='example: rafale generate runs/pythia-tiny-stories --prompt "Once upon a time" --max-new-tokens 64')
    decoders = [family for family in FAMILIES.values() if family.can_generate]
    parser.add_argument("model", help=f"a decoder's run folder (its latest checkpoint) or Hugging Face model folder "
                        f"(a run's export/, or a downloaded Hub model): {', '.join(f.name for f in decoders)} "
                        f"({', '.join(a for f in decoders for a in f.hf.architectures)})")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="a file of prompts, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens whose probability adds up to p")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    args = parser.parse_args(argv)

    if args.max_new_tokens < 1:
        raise RafaleError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise RafaleError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise RafaleError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise RafaleError(f"--top-p must be in (0, 1], got {args.top_p}")
    if (args.top_k is not None or args.top_p is not None) and args.temperature == 0:
        raise RafaleError("--top-k and --top-p sample: give a --temperature above 0 as well")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise RafaleError(f"--prompt-file: no such file: {path}")
        prompts = [line for line in read_utf8(path, "--prompt-file").splitlines() if line.strip()]
        if not prompts:
            raise RafaleError(f"--prompt-file: {path} holds no prompts")
    else:
        prompts = [args.prompt]

    model, tokenizer = load_decoder(Path(args.model).expanduser())
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        generate_text(model, tokenizer, prompts, stream=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()), **sampling)
        sys.stdout.write("\n")
    else:
        for prompt, text in zip(prompts, generate_text(model, tokenizer, prompts, **sampling)):
            print(f"{prompt}{text}\n")
    return 0
